"""evaluate: metric values on hand-made predictions, the paired bootstrap and verdict, and the MLflow one-liner."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from classifier_workspace import CLASSES, make_workspace, micro_params, write_params
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pipeline.classifier import evaluate as evaluate_module
from pipeline.classifier.evaluate import evaluate
from pipeline.classifier.metrics import (
    VERDICT_HELPED,
    VERDICT_HURT,
    VERDICT_UNSURE,
    ci95,
    classification_metrics,
    mean_std,
    metric_arrays,
    paired_draws,
    paired_gain,
    resample_indices,
    verdict,
)
from pipeline.classifier.train import train_variant
from pipeline.core.cli import run_stage


pytestmark = pytest.mark.usefixtures("one_thread")


def _onehot(pred, k=3, confidence=0.8):
    proba = np.full((len(pred), k), (1 - confidence) / (k - 1))
    proba[np.arange(len(pred)), pred] = confidence
    return proba


# Ten test images of three classes; predictions chosen so every number can be checked by hand:
#            actual: a a a a b b b c c c
#         predicted: a a a b b b a c a c
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 0, 2])
NAMES = ["a", "b", "c"]


def test_metrics_on_hand_made_predictions():
    assert confusion_matrix(Y_TRUE, Y_PRED, labels=range(3)).tolist() == [[3, 1, 0], [1, 2, 0], [1, 0, 2]]
    proba = _onehot(Y_PRED)
    m = classification_metrics(Y_TRUE, proba, NAMES)
    recall = {"a": 3 / 4, "b": 2 / 3, "c": 2 / 3}
    precision = {"a": 3 / 5, "b": 2 / 3, "c": 2 / 2}
    f1 = {c: 2 * recall[c] * precision[c] / (recall[c] + precision[c]) for c in NAMES}
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx(m["balanced_accuracy"])
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    for c in NAMES:
        assert m[f"recall_{c}"] == pytest.approx(recall[c])
        assert m[f"precision_{c}"] == pytest.approx(precision[c])
    # One-vs-rest AUROC of a two-level score: AUC = P(score_pos > score_neg) + 0.5 P(tie).
    # Class a: positives score high 3/4 of the time, negatives (6 of them) 2/6 of the time.
    auc_a = (3 / 4) * (4 / 6) + 0.5 * ((3 / 4) * (2 / 6) + (1 / 4) * (4 / 6))
    auc_b = (2 / 3) * (6 / 7) + 0.5 * ((2 / 3) * (1 / 7) + (1 / 3) * (6 / 7))
    auc_c = (2 / 3) * 1 + 0.5 * ((1 / 3) * 1)
    assert m["auroc_macro"] == pytest.approx((auc_a + auc_b + auc_c) / 3)


def test_class_absent_from_test_is_handled():
    names = [*NAMES, "d"]  # class d exists in data.classes but has no test image
    proba = np.hstack([_onehot(Y_PRED), np.zeros((10, 1))])
    proba[0] = [0.1, 0.1, 0.1, 0.7]  # ... and is even predicted once
    m = classification_metrics(Y_TRUE, proba, names)
    assert "recall_d" not in m and "precision_d" not in m
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert np.isfinite(list(m.values())).all()
    assert confusion_matrix(Y_TRUE, proba.argmax(1), labels=range(4))[0].tolist() == [2, 1, 0, 1]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_match_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "e"]
    for _ in range(20):
        y = rng.integers(0, 4, 60)  # class e never occurs
        proba = rng.dirichlet(np.ones(5), 60)
        proba[:, :4] += np.eye(4)[y] * rng.uniform(0, 0.5)
        pred = proba.argmax(1)
        m = classification_metrics(y, proba, names)
        labels = [0, 1, 2, 3]
        expected = {"balanced_accuracy": balanced_accuracy_score(y, pred), "accuracy": accuracy_score(y, pred),
                    "macro_recall": recall_score(y, pred, labels=labels, average="macro", zero_division=0),
                    "macro_f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
                    "auroc_macro": np.mean([roc_auc_score(y == c, proba[:, c]) for c in labels])}
        for c, r, p in zip(labels, recall_score(y, pred, labels=labels, average=None, zero_division=0),
                           precision_score(y, pred, labels=labels, average=None, zero_division=0)):
            expected.update({f"recall_{names[c]}": r, f"precision_{names[c]}": p})
        assert m == pytest.approx(expected)
    # Many resamples at once: row r scores resample r, NaN where the one-set metrics leave a key out.
    indices = rng.integers(0, 60, (30, 60))
    rows = metric_arrays(y[indices], proba[indices], names)
    for r, idx in enumerate(indices):
        single = classification_metrics(y[idx], proba[idx], names)
        assert {k: v[r] for k, v in rows.items() if not np.isnan(v[r])} == pytest.approx(single)


def test_bootstrap_ci_contains_gain_and_verdicts_are_clear_cut():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    good = _onehot(np.where(rng.random(200) < 0.9, y, (y + 1) % 3))  # ~90% right
    poor = _onehot(np.where(rng.random(200) < 0.4, y, (y + 1) % 3))  # ~40% right
    base, aug = [classification_metrics(y, poor, NAMES)], [classification_metrics(y, good, NAMES)]
    gain = paired_gain(base, aug)
    draws = paired_draws(y, [poor], [good], NAMES, resample_indices(len(y), 300, 0))
    for key in ("balanced_accuracy", "macro_f1", "auroc_macro", "recall_a"):
        low, high = ci95(draws[key])
        assert low <= gain[key] <= high, key
    ci = ci95(draws["balanced_accuracy"])
    assert ci[0] > 0.3
    assert verdict(*ci) == VERDICT_HELPED
    worse = paired_draws(y, [good], [poor], NAMES, resample_indices(len(y), 300, 0))
    assert verdict(*ci95(worse["balanced_accuracy"])) == VERDICT_HURT
    same = ci95(paired_draws(y, [poor], [poor], NAMES, resample_indices(len(y), 100, 0))["balanced_accuracy"])
    assert same == (0.0, 0.0) and verdict(*same) == VERDICT_UNSURE
    assert verdict(-0.01, 0.02) == VERDICT_UNSURE and verdict(0.001, 0.2) == VERDICT_HELPED and verdict(-0.3, -0.1) == VERDICT_HURT
    # Several seeds: gain and CI pool the per-seed paired differences.
    two = paired_draws(y, [poor, poor], [good, poor], NAMES, resample_indices(len(y), 200, 0))
    low, high = ci95(two["balanced_accuracy"])
    assert low > 0 and high < ci[1]
    # A resample lacking a class has no recall for it: NaN there, and the interval skips it.
    few = paired_draws(y[:3], [poor[:3]], [good[:3]], NAMES, resample_indices(3, 50, 0))
    assert np.isnan(few["recall_c"]).any() and np.isfinite(ci95(few["recall_c"])).all()
    stats = mean_std([{"x": 0.5}, {"x": 0.7}])
    assert stats == pytest.approx({"x": 0.6, "x_std": np.std([0.5, 0.7], ddof=1)})


def train_parent(root) -> str:
    runs = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string="tags.stage LIKE 'train@%'")
    assert runs["tags.mlflow.parentRunId"].nunique() == 1
    return runs["tags.mlflow.parentRunId"].iloc[0]


ALL_VARIANTS = ["augmented", "base_only", "baseline", "real_ceiling"]
EVALUATE_RUNS_FILTER = "tags.stage = 'evaluate'"  # the filter of the module docstring's one-liner


def latest_evaluation():
    """The documented one-liner's query (module docstring of pipeline/classifier/evaluate.py)."""
    runs = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string=EVALUATE_RUNS_FILTER,
                              order_by=["attributes.start_time DESC"])
    return runs[runs["tags.evaluation_id"] == runs["tags.evaluation_id"].iloc[0]]


def test_mlflow_one_liner_returns_one_run_per_variant(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws", reserve=3)
    monkeypatch.chdir(root)
    params = micro_params(seeds=[0, 1], real_per_class=6, per_class=2)
    write_params(root, params)
    for variant in ALL_VARIANTS:
        assert run_stage("train", train_variant, item="variant", argv=[variant]) == 0
    for _ in range(2):  # as stages/evaluate.py runs it; a second evaluation must not confuse the query
        assert run_stage("evaluate", evaluate, track=False, argv=[]) == 0

    assert EVALUATE_RUNS_FILTER in evaluate_module.__doc__.replace('\\"', '"')
    assert "r[r['tags.evaluation_id'] == r['tags.evaluation_id'].iloc[0]]" in evaluate_module.__doc__
    runs = latest_evaluation()
    assert sorted(runs["tags.variant"]) == ALL_VARIANTS
    assert runs["metrics.balanced_accuracy"].notna().all()
    assert runs["tags.mlflow.parentRunId"].nunique() == 1
    every = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string=EVALUATE_RUNS_FILTER)
    assert len(every) == 8 and every.groupby("tags.evaluation_id")["tags.variant"].apply(sorted).map(tuple).tolist() == [
        tuple(ALL_VARIANTS)] * 2
    assert runs["tags.verdict"].nunique() == 1 and runs["metrics.gain_balanced_accuracy"].notna().all()
    assert runs["tags.mlflow.parentRunId"].iloc[0] == train_parent(root)

    metrics = json.loads((root / "reports/metrics.json").read_text())
    by_variant = runs.set_index("tags.variant")
    for variant in ALL_VARIANTS:
        assert by_variant.at[variant, "metrics.balanced_accuracy"] == pytest.approx(metrics[variant]["balanced_accuracy"])
    for variant in ("augmented", "base_only", "real_ceiling"):
        assert by_variant.at[variant, "metrics.gain_over_baseline"] == pytest.approx(
            metrics["gain_over_baseline"][variant]["balanced_accuracy"])
    assert np.isnan(by_variant.at["baseline", "metrics.gain_over_baseline"])
    train_runs = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string="tags.stage LIKE 'train@%'")
    assert sorted(train_runs["tags.variant"]) == ALL_VARIANTS
    assert set(train_runs["tags.mlflow.parentRunId"]) == set(runs["tags.mlflow.parentRunId"])
    tags = train_runs.set_index("tags.variant")
    assert tags.at["augmented", "tags.synthetic_count"] == "9"  # 12 generated, 3 screened out and tags.at["baseline", "tags.synthetic_count"] == "0"
    assert tags.at["baseline", "tags.seed"] == "0,1" and tags.at["baseline", "tags.method"] == "lora"
    assert tags.at["baseline", "tags.classes"] == ",".join(CLASSES)
    assert train_runs["metrics.val_balanced_accuracy_seed1"].notna().all()

    # metrics.json: both variants, gain, CI and verdict; mean ± std over the two seeds.
    assert set(metrics) >= {"baseline", "augmented", "gain", "gain_ci95", "verdict"}
    assert metrics["verdict"] in (VERDICT_HELPED, VERDICT_HURT, VERDICT_UNSURE)
    assert metrics["baseline"]["n_seeds"] == 2 and "balanced_accuracy_std" in metrics["baseline"]
    assert metrics["gain"]["balanced_accuracy"] == pytest.approx(
        metrics["augmented"]["balanced_accuracy"] - metrics["baseline"]["balanced_accuracy"])
    ci = metrics["gain_ci95"]["balanced_accuracy"]
    assert ci["low"] <= ci["high"]
    # The controls: every variant's gain over baseline from one shared bootstrap, and the recovered share.
    assert metrics["variants"] == ["baseline", "augmented", "base_only", "real_ceiling"] and metrics["skipped"] == {}
    for variant in ("augmented", "base_only", "real_ceiling"):
        g = metrics["gain_over_baseline"][variant]
        assert g["balanced_accuracy"] == pytest.approx(
            metrics[variant]["balanced_accuracy"] - metrics["baseline"]["balanced_accuracy"])
        assert g["ci_low"] <= g["balanced_accuracy"] <= g["ci_high"]
    assert metrics["gain_over_baseline"]["augmented"]["balanced_accuracy"] == pytest.approx(metrics["gain"]["balanced_accuracy"])
    share = metrics["recovered_share"]
    assert set(share) == {"value", "ci_low", "ci_high", "defined", "note"}
    assert share["defined"] == (metrics["gain_over_baseline"]["real_ceiling"]["ci_low"] > 0)
    assert (share["value"] is None) == (not share["defined"])
    assert len(evaluate_module.verdict_lines(metrics)) == 4
    for variant in ("baseline", "augmented"):
        table = pd.read_csv(root / f"reports/plots/confusion_{variant}.csv")
        assert list(table.columns) == ["actual", "predicted"] and len(table) == 2 * len(CLASSES)
        assert set(table["actual"]) <= set(CLASSES) and set(table["predicted"]) <= set(CLASSES)
        assert (root / f"reports/plots/confusion_{variant}.png").stat().st_size > 1000

    # Without a reserve (data.real_per_class null) the ceiling is skipped: three runs, the share undefined.
    write_params(root, micro_params(seeds=[0, 1], per_class=2))
    assert run_stage("train", train_variant, item="variant", argv=["real_ceiling"]) == 0
    assert run_stage("evaluate", evaluate, track=False, argv=[]) == 0
    assert sorted(latest_evaluation()["tags.variant"]) == ["augmented", "base_only", "baseline"]
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert "real_ceiling" not in metrics and set(metrics["skipped"]) == {"real_ceiling"}
    assert set(metrics["gain_over_baseline"]) == {"augmented", "base_only"}
    assert not metrics["recovered_share"]["defined"] and metrics["recovered_share"]["value"] is None
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=r"train@real_ceiling was skipped \(data.real_per_class is null.*dvc repro train@real_ceiling"):
        evaluate(micro_params(seeds=[0, 1], real_per_class=6, per_class=2))  # a stale skip marker is not read as a model


def test_evaluate_refuses_a_test_list_with_synthetic_images(tmp_path, monkeypatch):
    """The test split is re-derived from split.csv at run time; a row pointing into data/synthetic is refused."""
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    split = pd.read_csv(root / "data/prepared/split.csv")
    first_test_row = split.index[split["split"] == "test"][0]
    split.loc[first_test_row, "path"] = "data/synthetic/bcc/bcc_0000.png"
    split.to_csv(root / "data/prepared/split.csv", index=False)
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="leakage guard: synthetic image .* in the test list"):
        evaluate(micro_params())
