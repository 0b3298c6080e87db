"""`make gpu-smoke` (bench/gpu_smoke.py): one line and a non-zero exit without CUDA; one PASS/FAIL line per stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_smoke import summarize

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_it_stops_with_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU if this machine has one
    done = subprocess.run([sys.executable, "-m", "bench.gpu_smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-smoke: no CUDA device visible"), done.stderr
    assert "Traceback" not in done.stderr


def test_each_stage_passes_on_its_done_line_and_fails_with_its_error():
    log = "\n".join([
        "Running stage 'base':",
        "base: done in 3.5 s, peak GPU memory 120 MiB, 2 torch thread(s)",
        "Running stage 'prepare':",
        "prepare: done in 0.4 s, 1 torch thread(s)",
        "Running stage 'finetune@df':",
        "error: finetune@df: models/base: no model_index.json",
        "ERROR: failed to reproduce 'finetune@df'",
    ])
    walls = {"base": {"wall_s": 9.0}, "prepare": {"wall_s": 2.0}, "finetune@df": {"wall_s": 5.0}}
    results = {r.name: r for r in summarize(["prepare", "base", "finetune@df", "generate@df"], log, walls)}

    assert results["base"].passed and results["base"].gpu_mib == 120 and results["base"].stage_s == 3.5
    assert results["prepare"].passed and results["prepare"].gpu_mib is None
    assert "no CUDA" in results["prepare"].line() and results["base"].line().startswith("PASS  base")
    assert not results["finetune@df"].passed
    assert results["finetune@df"].line() == "FAIL  finetune@df        error: finetune@df: models/base: no model_index.json"
    assert not results["generate@df"].passed and "not run" in results["generate@df"].error
