"""The sweep's read-back side, on a real git repo holding experiment commits the way DVC lays them out.

(The queueing side runs for real in tests/test_pipeline_e2e.py; here each case takes milliseconds.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.core.atomic import write_figure
from pipeline.core.errors import PipelineError
from pipeline.core.params import parse_params
from pipeline.sweep import Point, axis_rows, collect, markdown, overrides, per_class, plan, plot, write_outputs


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def _experiment(root: Path, name: str, method: str, amount: int, baseline: float, augmented: float,
                real_per_class: int | None = 20, controls: dict[str, float] | None = None,
                fid: float | None = None) -> None:
    """One commit with the experiment's params.yaml and metrics.json, at refs/exps/<..>/<baseline>/<name>.

    ``controls``: {variant: balanced accuracy}; each one's gain is written the way evaluate writes it
    (``gain_over_baseline`` with a CI)."""
    (root / "reports").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"real_per_class": real_per_class},
                                                      "diffusion": {"method": method},
                                                      "generate": {"per_class": amount}}))
    gain = augmented - baseline
    metrics = {
        "baseline": {"balanced_accuracy": baseline}, "augmented": {"balanced_accuracy": augmented},
        "gain": {"balanced_accuracy": gain},
        "gain_ci95": {"balanced_accuracy": {"low": gain - 0.05, "high": gain + 0.05}},
        "verdict": "inconclusive at 95%", "gain_over_baseline": {}}
    for variant, value in (controls or {}).items():
        metrics[variant] = {"balanced_accuracy": value}
        metrics["gain_over_baseline"][variant] = {"balanced_accuracy": value - baseline,
                                                  "ci_low": value - baseline - 0.04, "ci_high": value - baseline + 0.04}
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    if fid is not None:  # the screen's and the fidelity stage's per-class files; fid < 0 stands for a flagged FID
        flags = {"fid": "out of range"} if fid < 0 else {}
        (root / "reports/quality.json").write_text(json.dumps({"classes": {"df": {
            "fid": fid, "kid_mean": 0.01, "n_memorized": 1, "n_synthetic": amount, "flags": flags}}}))
        (root / "reports/fidelity.json").write_text(json.dumps({"classes": {"df": {"augmented": {"share_own_class": augmented}}}}))
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", name)
    _git(root, "update-ref", f"refs/exps/ab/cdef0123/{name}", "HEAD")


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    return tmp_path


def test_plan_crosses_methods_with_both_axes_once_each():
    params = parse_params({"data": {"real_per_class": 20}, "generate": {"per_class": 100},
                           "sweep": {"methods": ["lora", "textual_inversion"], "amounts": [50, 100],
                                     "real_per_class": [10, 20]}})
    points = plan(params, "s1")
    assert [p.name for p in points] == [
        "s1-lora-50-real20", "s1-lora-100-real20", "s1-lora-100-real10",
        "s1-textual-inversion-50-real20", "s1-textual-inversion-100-real20", "s1-textual-inversion-100-real10"]
    assert overrides(points[2], params) == {"diffusion.method": "lora", "generate.per_class": 100,
                                            "data.real_per_class": 10, "data.finetune_images": 10}
    assert overrides(points[0], params)["data.finetune_images"] == 20  # fine-tune images drawn from the K
    uncapped = parse_params({"sweep": {"methods": ["lora"], "amounts": [50], "real_per_class": []}})
    assert [(p.name, overrides(p, uncapped)["data.real_per_class"]) for p in plan(uncapped, "s2")] == [("s2-lora-50-realall", "null")]
    with pytest.raises(PipelineError, match=r"sweep.real_per_class: real_per_class must be distinct and > 0 \(got \[5, 5\]\)"):
        parse_params({"sweep": {"real_per_class": [5, 5]}})


def test_collect_reads_each_point_from_its_commit_and_adds_the_baseline_point(repo, tmp_path):
    _experiment(repo, "s1-lora-50-real20", "lora", 50, 0.80, 0.85)
    _experiment(repo, "s1-dreambooth-50-real20", "dreambooth", 50, 0.80, 0.70)
    frame = collect([Point("lora", 50, 20, "s1-lora-50-real20"), Point("dreambooth", 50, 20, "s1-dreambooth-50-real20")],
                    repo)

    rows = {(r.method, r.amount): r for r in frame.itertuples()}
    assert set(rows) == {("lora", 0), ("lora", 50), ("dreambooth", 0), ("dreambooth", 50)}
    assert rows[("lora", 50)].gain == pytest.approx(0.05) and rows[("dreambooth", 50)].gain == pytest.approx(-0.10)
    assert rows[("lora", 0)].gain == 0.0 and rows[("lora", 0)].augmented == pytest.approx(0.80)
    assert frame["real_ceiling_gain"].isna().all()  # no control in these metrics: no control column filled
    assert "Best point: **lora** with 50 synthetic images per class at 20 real per class, gain +0.050" in markdown(frame, [])
    chart = plot(frame, "amount", "amount")
    assert chart.axes[0].get_legend_handles_labels()[1] == ["dreambooth", "lora"]
    write_figure(tmp_path / "chart.png", chart)
    assert (tmp_path / "chart.png").stat().st_size > 5_000


def test_scarcity_axis_charts_gain_against_real_images_with_the_ceiling(repo, tmp_path, monkeypatch):
    """A micro sweep over real_per_class 5, 10, 20 (two methods): its own chart, one line per method and one for
    the real ceiling; base_only, which no experiment ran, gets no line."""
    params = parse_params({"data": {"real_per_class": 20, "finetune_images": 5}, "generate": {"per_class": 50},
                           "sweep": {"methods": ["lora", "dreambooth"], "amounts": [50], "real_per_class": [5, 10, 20]}})
    points = plan(params, "s3")
    assert len(points) == 6  # (method, 50, 20) is on both axes and runs once
    accuracy = {5: 0.40, 10: 0.50, 20: 0.60}
    for p in points:
        base = accuracy[p.real_per_class]
        _experiment(repo, p.name, p.method, p.amount, base, base + (0.02 if p.method == "lora" else -0.01),
                    real_per_class=p.real_per_class, controls={"real_ceiling": base + 0.15})
    frame = collect(points, repo)

    scarce = axis_rows(frame, "real_per_class", params)
    assert sorted(scarce["real_per_class"].unique()) == [5, 10, 20] and (scarce["amount"] == 50).all()
    assert scarce["real_ceiling_gain"].to_numpy() == pytest.approx([0.15] * 6)
    assert scarce[scarce.method == "lora"]["gain"].to_numpy() == pytest.approx([0.02] * 3)
    labels = plot(scarce, "real_per_class", "real").axes[0].get_legend_handles_labels()[1]
    assert labels == ["dreambooth", "lora", "real_ceiling"]
    amount = axis_rows(frame, "amount", params)
    assert sorted(amount["amount"].unique()) == [0, 50] and (amount["real_per_class"] == 20).all()
    assert amount.loc[amount.amount == 0, "real_ceiling_gain"].tolist() == [0.0, 0.0]  # no extra image, no gain

    monkeypatch.setattr("pipeline.sweep._log_to_mlflow", lambda *args: None)  # MLflow logging is the e2e test's
    summary = write_outputs(frame, params, repo, "s3")
    assert (repo / "reports/sweep/gain_vs_real.png").stat().st_size > 5_000
    assert "![gain vs real](gain_vs_real.png)" in summary.read_text()
    assert "| lora | 50 | 5 | s3-lora-50-real5 | 0.400 | 0.420 | +0.020 |" in summary.read_text()
    written = json.loads((repo / "reports/sweep/sweep.json").read_text())
    assert {p["real_per_class"] for p in written["points"]} == {5, 10, 20}
    assert all(p["base_only_gain"] is None for p in written["points"])  # absent control: null, not NaN


def test_collect_rejects_a_missing_experiment_and_one_run_with_other_params(repo):
    _experiment(repo, "s1-lora-50-real20", "lora", 100, 0.80, 0.85)  # the commit says 100, the plan says 50
    with pytest.raises(PipelineError, match="s1-lora-50-real20: its params.yaml is not \\(lora, 50, real_per_class 20\\)"):
        collect([Point("lora", 50, 20, "s1-lora-50-real20")], repo)
    _experiment(repo, "s1-lora-50-real10", "lora", 50, 0.80, 0.85, real_per_class=20)  # ran at another cap
    with pytest.raises(PipelineError, match="its params.yaml is not \\(lora, 50, real_per_class 10\\)"):
        collect([Point("lora", 50, 10, "s1-lora-50-real10")], repo)
    with pytest.raises(PipelineError, match="experiment s1-lora-200-real20 not found under refs/exps"):
        collect([Point("lora", 200, 20, "s1-lora-200-real20")], repo)


def test_the_methods_sit_side_by_side_per_class_at_the_configured_point(repo):
    points = [Point("lora", 50, 20, "s4-lora-50-real20"), Point("hypernetwork", 50, 20, "s4-hypernetwork-50-real20"),
              Point("lora", 100, 20, "s4-lora-100-real20")]
    _experiment(repo, points[0].name, "lora", 50, 0.80, 0.62, fid=3.5)
    _experiment(repo, points[1].name, "hypernetwork", 50, 0.80, 0.41, fid=-1.0)
    _experiment(repo, points[2].name, "lora", 100, 0.80, 0.90, fid=2.0)
    params = parse_params({"data": {"real_per_class": 20}, "generate": {"per_class": 50}})
    table = per_class(points, repo, params)
    assert list(zip(table["method"], table["fidelity"])) == [("lora", 0.62), ("hypernetwork", 0.41)]  # not amount 100
    assert list(table["fid"]) == [3.5, "flagged"] and list(table["memorized"]) == ["1 / 50", "1 / 50"]
    text = markdown(collect(points, repo), [], table)
    assert "| df | lora | 0.620 | 3.500 | 0.010 | 1 / 50 | – |" in text
    assert "| df | hypernetwork | 0.410 | flagged | 0.010 | 1 / 50 | – |" in text


def test_experiments_side_by_side_share_the_cores_as_torch_threads(monkeypatch):
    from pipeline import sweep
    from pipeline.core import launch

    monkeypatch.delenv(launch.THREADS_ENV, raising=False)
    monkeypatch.setattr("joblib.cpu_count", lambda: 4)
    assert launch.THREADS_ENV not in sweep._env(1)
    assert sweep._env(2)[launch.THREADS_ENV] == "2"
    assert sweep._env(8)[launch.THREADS_ENV] == "1"
    monkeypatch.setenv(launch.THREADS_ENV, "3")
    assert sweep._env(2)[launch.THREADS_ENV] == "3"  # a count someone chose wins
