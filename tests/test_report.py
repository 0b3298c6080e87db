"""report: summary.md answers first, carries the tables, and every figure it links exists."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
from classifier_workspace import CLASSES, make_workspace, micro_params, write_params

from pipeline.classifier.evaluate import evaluate
from pipeline.classifier.train import train_variant
from pipeline.core.cli import run_stage
from pipeline.core.errors import PipelineError
from pipeline.report import fidelity_table, headline, quality_table, report


pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_writes_summary_with_tables_and_figures(tmp_path, monkeypatch, capsys):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    params = micro_params()
    write_params(root, params)
    (root / "reports/data.json").write_text(json.dumps(
        {"classes": {c: {"train": 6, "val": 2, "test": 2, "images": 10, "lesions": 10, "finetune": 3} for c in CLASSES}}))
    for variant in ("baseline", "augmented", "base_only"):  # evaluate reads the base_only control too
        train_variant(params, variant)
    metrics = evaluate(params)

    assert run_stage("report", report, argv=[]) == 0
    summary = (root / "reports/summary.md").read_text()
    lines = [line for line in summary.splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    verdict = metrics["verdict"]
    assert lines[1].startswith(f"**{verdict[0].upper()}{verdict[1:]}.**")  # the answer comes first
    assert f"baseline **{metrics['baseline']['balanced_accuracy']:.3f}**" in lines[1]
    assert "95% CI" in lines[1]
    assert lines[2].startswith("- The same number of images from the base model")  # the controls, in plain words
    assert "No class fidelity: run `dvc repro fidelity`." in summary and "No quality figures" in summary
    for heading in ("## Data", "## Baseline vs augmented", "## Per-class recall", "## Real vs synthetic samples",
                    "## Confusion matrices"):
        assert heading in summary
    assert "| class | diagnosis | train | val | test | lesions | fine-tune | synthetic |" in summary
    assert "| `mel` | melanoma | 6 | 2 | 2 | 10 | 3 | 8 |" in summary  # data.json + manifests (2 draws of 4)
    assert re.search(r"\| balanced accuracy \| [0-9.]+ \| [0-9.]+ \| [+-][0-9.]+ \| \[[+-][0-9.]+, [+-][0-9.]+\] \|", summary)
    for c in CLASSES:
        assert re.search(rf"\| `{c}` \| 2 \| [0-9.]+ \| [0-9.]+ \| [+-][0-9.]+ \|", summary), c

    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)
    assert {"figures/samples.png", "figures/confusion.png", "figures/per_class_gain.png"} <= set(figures)
    for figure in figures:
        assert not figure.startswith("/")
        assert (root / "reports" / figure).stat().st_size > 2000, figure

    # MLflow: the report's run holds the figures, and the execution's parent run is closed.
    runs = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string="tags.stage = 'report'")
    assert len(runs) == 1
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs.iloc[0]["run_id"], "figures")]
    assert "figures/samples.png" in artifacts
    parent = mlflow.get_run(runs.iloc[0]["tags.mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"

    # The headline: reports/headline.json in reading order, the same numbers on the parent run.
    headline_file = json.loads((root / "reports/headline.json").read_text())
    gains = metrics["gain_over_baseline"]
    assert metrics["variants"] == ["baseline", "augmented", "base_only"]
    assert list(headline_file) == [
        "balanced_accuracy_baseline", "balanced_accuracy_augmented", "balanced_accuracy_base_only",
        "gain_augmented", "gain_augmented_ci_low", "gain_augmented_ci_high",
        "gain_base_only", "gain_base_only_ci_low", "gain_base_only_ci_high", "verdict"]  # no ceiling, no fidelity here
    assert headline_file["balanced_accuracy_base_only"] == metrics["base_only"]["balanced_accuracy"]
    assert (headline_file["gain_augmented"], headline_file["gain_augmented_ci_low"],
            headline_file["gain_augmented_ci_high"]) == tuple(gains["augmented"].values())
    assert headline_file["verdict"] == verdict
    assert parent.data.tags["verdict"] == verdict
    assert parent.data.metrics == pytest.approx({k: v for k, v in headline_file.items() if k != "verdict"})

    # The per-class gain chart's data, a DVC plot beside the PNG.
    bars = json.loads((root / "reports/figures/per_class_gain.json").read_text())
    assert [b["class"] for b in bars] == list(CLASSES)
    for bar in bars:
        assert bar["gain"] == metrics["gain"][f"recall_{bar['class']}"]
        assert bar["ci_low"] <= bar["gain"] <= bar["ci_high"]


def test_headline_reads_every_variant_the_recovered_share_and_the_fidelity():
    gain = {"balanced_accuracy": 0.1, "ci_low": -0.05, "ci_high": 0.25}
    metrics = {
        "variants": ["baseline", "augmented", "real_ceiling"],
        "baseline": {"balanced_accuracy": 0.5}, "augmented": {"balanced_accuracy": 0.6},
        "real_ceiling": {"balanced_accuracy": 0.8},
        "gain_over_baseline": {"augmented": gain, "real_ceiling": {"balanced_accuracy": 0.3, "ci_low": 0.2, "ci_high": 0.4}},
        "recovered_share": {"value": 1 / 3, "ci_low": -0.2, "ci_high": 0.9, "defined": True, "note": None},
    }
    fidelity = {"mean": {"augmented": {"share_own_class": 0.85, "mean_p_own_class": 0.7},
                         "base_only": {"share_own_class": 0.25, "mean_p_own_class": 0.2}, "oracle_test_recall": 0.9}}
    assert headline(metrics, fidelity) == {
        "balanced_accuracy_baseline": 0.5, "balanced_accuracy_augmented": 0.6, "balanced_accuracy_real_ceiling": 0.8,
        "gain_augmented": 0.1, "gain_augmented_ci_low": -0.05, "gain_augmented_ci_high": 0.25,
        "gain_real_ceiling": 0.3, "gain_real_ceiling_ci_low": 0.2, "gain_real_ceiling_ci_high": 0.4,
        "recovered_share": 1 / 3, "recovered_share_ci_low": -0.2, "recovered_share_ci_high": 0.9,
        "fidelity_augmented_mean": 0.85, "fidelity_base_only_mean": 0.25}
    undefined = {**metrics, "recovered_share": {"value": None, "ci_low": None, "ci_high": None, "defined": False}}
    assert not any(k.startswith(("recovered", "fidelity")) for k in headline(undefined, {}))

def test_report_without_metrics_is_a_one_line_error(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    with pytest.raises(PipelineError, match=r"reports/metrics.json: not found; run `dvc repro evaluate` first"):
        report(micro_params())


def test_fidelity_and_quality_tables_carry_every_class_and_the_flags():
    fidelity = {"classes": {"bcc": {"oracle_test_recall": 0.9, "augmented": {"share_own_class": 0.8, "mean_p_own_class": 0.7},
                                    "base_only": {"share_own_class": 0.2, "mean_p_own_class": 0.25}},
                            "mel": {"oracle_test_recall": None, "augmented": {"share_own_class": 0.6, "mean_p_own_class": 0.5},
                                    "base_only": {"share_own_class": 0.3, "mean_p_own_class": 0.35}}},
                "mean": {"augmented": {"share_own_class": 0.7, "mean_p_own_class": 0.6},
                         "base_only": {"share_own_class": 0.25, "mean_p_own_class": 0.3}, "oracle_test_recall": 0.9}}
    table = fidelity_table(fidelity, ["bcc", "mel"])
    assert "| `bcc` | 0.900 | 0.800 | 0.700 | 0.200 | 0.250 |" in table
    assert "| `mel` | — | 0.600 | 0.500 | 0.300 | 0.350 |" in table  # no real test image: recall unknown
    assert "| **mean** | 0.900 | 0.700 | 0.600 | 0.250 | 0.300 |" in table
    quality = {"extractor": "baseline_classifier", "classes": {
        "bcc": {"fid": 12.5, "fid_real_vs_real": 3.0, "kid_mean": 0.01, "kid_real_vs_real": 0.0, "precision": 0.9,
                "recall": 0.5, "n_memorized": 1, "n_synthetic": 10, "n_kept": 9, "flags": {}},
        "mel": {"fid": 22784.0, "fid_real_vs_real": 2.0, "kid_mean": None, "kid_real_vs_real": None, "precision": 1.0,
                "recall": 0.1, "n_memorized": 0, "n_synthetic": 10, "n_kept": 10,
                "flags": {"fid": "11392x the real-vs-real FID"}}}}
    table = quality_table(quality, ["bcc", "mel"])
    assert "| `bcc` | 12.500 (3.000) | 0.010 (0.000) | 0.900 | 0.500 | 1 / 10 | 9 | — |" in table
    assert "| `mel` | 22784.000 (2.000) | — (—) | 1.000 | 0.100 | 0 / 10 | 10 | fid: 11392x the real-vs-real FID |" in table
