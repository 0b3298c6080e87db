"""The sweep's read-back side, on a real git repo holding experiment commits the way DVC lays them out.

(The queueing side runs for real in tests/test_pipeline_e2e.py; here each case takes milliseconds.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.params import parse_params
from pipeline.sweep import Point, collect, markdown, plan, plot


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def _experiment(root: Path, name: str, method: str, amount: int, baseline: float, augmented: float) -> None:
    """One commit with the experiment's params.yaml and metrics.json, at refs/exps/<..>/<baseline>/<name>."""
    (root / "reports").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"diffusion": {"method": method},
                                                      "generate": {"per_class": amount}}))
    gain = augmented - baseline
    (root / "reports/metrics.json").write_text(json.dumps({
        "baseline": {"balanced_accuracy": baseline}, "augmented": {"balanced_accuracy": augmented},
        "gain": {"balanced_accuracy": gain},
        "gain_ci95": {"balanced_accuracy": {"low": gain - 0.05, "high": gain + 0.05}},
        "verdict": "inconclusive at 95%"}))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", name)
    _git(root, "update-ref", f"refs/exps/ab/cdef0123/{name}", "HEAD")


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    return tmp_path


def test_plan_names_one_experiment_per_method_and_amount():
    params = parse_params({"sweep": {"methods": ["lora", "textual_inversion"], "amounts": [10, 20]}})
    names = [p.name for p in plan(params, "s1")]
    assert names == ["s1-lora-10", "s1-lora-20", "s1-textual-inversion-10", "s1-textual-inversion-20"]


def test_collect_reads_each_point_from_its_commit_and_adds_the_baseline_point(repo, tmp_path):
    _experiment(repo, "s1-lora-50", "lora", 50, 0.80, 0.85)
    _experiment(repo, "s1-dreambooth-50", "dreambooth", 50, 0.80, 0.70)
    frame = collect([Point("lora", 50, "s1-lora-50"), Point("dreambooth", 50, "s1-dreambooth-50")], repo)

    rows = {(r.method, r.amount): r for r in frame.itertuples()}
    assert set(rows) == {("lora", 0), ("lora", 50), ("dreambooth", 0), ("dreambooth", 50)}
    assert rows[("lora", 50)].gain == pytest.approx(0.05) and rows[("dreambooth", 50)].gain == pytest.approx(-0.10)
    assert rows[("lora", 0)].gain == 0.0 and rows[("lora", 0)].augmented == pytest.approx(0.80)
    assert "Best point: **lora** with 50 images per class, gain +0.050" in markdown(frame)
    plot(frame, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 5_000


def test_collect_rejects_a_missing_experiment_and_one_run_with_other_params(repo):
    _experiment(repo, "s1-lora-50", "lora", 100, 0.80, 0.85)  # the commit says 100, the plan says 50
    with pytest.raises(PipelineError, match="s1-lora-50: its params.yaml is not \\(lora, 50\\)"):
        collect([Point("lora", 50, "s1-lora-50")], repo)
    with pytest.raises(PipelineError, match="experiment s1-lora-200 not found under refs/exps"):
        collect([Point("lora", 200, "s1-lora-200")], repo)
