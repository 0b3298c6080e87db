"""Smoke test of the benchmark harness: one benchmark on micro settings writes ratio fields and targets (not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_classifier_micro_writes_ratios(tmp_path):
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_THREADS": "1", "BENCH_REPORTS_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench", "classifier"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    bench = report["benchmarks"]["classifier"]
    demo = bench["variants"]["demo"]
    for arm in ("ours", "reference"):
        assert demo[arm]["images_per_s"] > 0 and demo[arm]["peak_rss_mib"] > 0
    assert demo["ratio_images_per_s"] > 0 and demo["ratio_peak_rss"] > 0
    assert report["targets"] and all(isinstance(t["pass"], bool) and "threshold" in t for t in report["targets"])
    assert "images/s ours/ref" in (tmp_path / "bench.md").read_text()
