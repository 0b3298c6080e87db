"""The control variants (base_only, real_ceiling), their gains and the recovered share, and the class-fidelity oracle."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from classifier_workspace import CLASSES, make_workspace, micro_params, write_params

from pipeline.classifier.dataset import assert_no_leakage, load_images, read_split, real_samples
from pipeline.classifier.evaluate import verdict_lines
from pipeline.classifier.metrics import (
    ci95,
    classification_metrics,
    gains_over_baseline,
    paired_draws,
    recovered_share,
    resample_indices,
)
from pipeline.classifier.model import load_classifier, predict_proba
from pipeline.classifier.oracle import FIDELITY_JSON, fidelity_lines, fidelity_table, own_class_scores, score_fidelity, train_oracle
from pipeline.classifier.train import skip_reason, train_variant, training_samples
from pipeline.core.cli import run_stage
from pipeline.core.errors import PipelineError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- gains and the recovered share

def _predictions(right_per_class: int, per_class: int = 20, classes: int = 3) -> np.ndarray:
    """Labels 0..classes-1, ``per_class`` each; the first ``right_per_class`` of each class right, the rest wrong.
    So a variant with more right images is right on a superset of another's: paired differences never change sign."""
    y = np.repeat(np.arange(classes), per_class)
    pred = (y + 1) % classes
    for c in range(classes):
        pred[c * per_class : c * per_class + right_per_class] = c
    return pred


Y = np.repeat(np.arange(3), 20)
NAMES = ["a", "b", "c"]


def _gains(y, preds: dict[str, list[np.ndarray]], indices, classes: int = 3):
    """What evaluate computes from predicted labels (as one-hot probabilities): the gains table and the draws."""
    names = NAMES if classes == 3 else list("abcd")
    probas = {v: [np.eye(classes)[p] for p in seeds] for v, seeds in preds.items()}
    per_seed = {v: [classification_metrics(y, p, names) for p in seeds] for v, seeds in probas.items()}
    draws = {v: paired_draws(y, probas["baseline"], probas[v], names, indices) for v in probas if v != "baseline"}
    return gains_over_baseline(per_seed, draws), draws


def test_gains_and_recovered_share_on_hand_made_predictions():
    # balanced accuracy: baseline 10/20 = 0.5, augmented 0.6, base_only 0.45, real_ceiling 0.7.
    preds = {"baseline": [_predictions(10)], "augmented": [_predictions(12)], "base_only": [_predictions(9)],
             "real_ceiling": [_predictions(14)]}
    assert classification_metrics(Y, np.eye(3)[preds["augmented"][0]], NAMES)["balanced_accuracy"] == pytest.approx(0.6)
    gains, draws = _gains(Y, preds, resample_indices(len(Y), 400, 0))
    assert gains["augmented"]["balanced_accuracy"] == pytest.approx(0.1)
    assert gains["base_only"]["balanced_accuracy"] == pytest.approx(-0.05)
    assert gains["real_ceiling"]["balanced_accuracy"] == pytest.approx(0.2)
    for variant, g in gains.items():
        assert g["ci_low"] <= g["balanced_accuracy"] <= g["ci_high"], variant
        assert len(draws[variant]["balanced_accuracy"]) == 400
    assert gains["augmented"]["ci_low"] > 0 and gains["base_only"]["ci_high"] <= 0  # supersets: one sign in every resample
    share = recovered_share(gains, draws)
    assert share["defined"] and share["value"] == pytest.approx(0.5)
    assert 0 <= share["ci_low"] <= 0.5 <= share["ci_high"] <= 1  # augmented's extra hits are a subset of the ceiling's


def test_recovered_share_is_undefined_when_the_ceiling_gain_may_be_zero():
    noisy = _predictions(10).copy()
    noisy[[0, 20]] = [1, 2]  # two hits lost ...
    noisy[[15, 35]] = [0, 1]  # ... two gained: the ceiling's gain is 0 and its CI straddles 0
    gains, draws = _gains(Y, {"baseline": [_predictions(10)], "augmented": [_predictions(12)], "real_ceiling": [noisy]},
                          resample_indices(len(Y), 300, 1))
    assert gains["real_ceiling"]["ci_low"] < 0 < gains["real_ceiling"]["ci_high"]
    share = recovered_share(gains, draws)
    assert not share["defined"] and share["value"] is None and "includes 0" in share["note"]
    worse = {**gains, "real_ceiling": {"balanced_accuracy": -0.2, "ci_low": -0.3, "ci_high": -0.1}}
    assert "below 0" in recovered_share(worse, draws)["note"]


def test_gains_pool_paired_seeds():
    # Seed 0: augmented +0.1, seed 1: augmented +0.3 -> pooled gain +0.2.
    preds = {"baseline": [_predictions(10), _predictions(8)], "augmented": [_predictions(12), _predictions(14)]}
    gains, draws = _gains(Y, preds, resample_indices(len(Y), 200, 0))
    assert gains["augmented"]["balanced_accuracy"] == pytest.approx(0.2)
    with pytest.raises(ValueError):  # seed k of a variant needs seed k of baseline
        _gains(Y, {"baseline": preds["baseline"], "augmented": preds["augmented"][:1]}, resample_indices(len(Y), 10, 0))
    # The pooled draw of a resample is the mean of the seeds' own draws.
    one = [_gains(Y, {"baseline": [b], "augmented": [a]}, resample_indices(len(Y), 200, 0))[1]["augmented"]
           for b, a in zip(preds["baseline"], preds["augmented"])]
    assert draws["augmented"]["balanced_accuracy"] == pytest.approx(
        (one[0]["balanced_accuracy"] + one[1]["balanced_accuracy"]) / 2)
    # On random predictions: the point gain is the difference of the two models' balanced accuracy.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    base = np.where(rng.random(300) < 0.5, y, rng.integers(0, 4, 300))
    aug = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    gains, draws = _gains(y, {"baseline": [base], "augmented": [aug]}, resample_indices(len(y), 500, 0), classes=4)
    assert gains["augmented"]["balanced_accuracy"] == pytest.approx(
        classification_metrics(y, np.eye(4)[aug], list("abcd"))["balanced_accuracy"]
        - classification_metrics(y, np.eye(4)[base], list("abcd"))["balanced_accuracy"])
    low, high = ci95(draws["augmented"]["balanced_accuracy"])
    assert (gains["augmented"]["ci_low"], gains["augmented"]["ci_high"]) == (low, high)


def _metrics(share: dict, skipped: dict | None = None) -> dict:
    gains = {"augmented": {"balanced_accuracy": 0.1, "ci_low": 0.02, "ci_high": 0.18},
             "base_only": {"balanced_accuracy": -0.04, "ci_low": -0.1, "ci_high": 0.01}}
    if not skipped:
        gains["real_ceiling"] = {"balanced_accuracy": 0.2, "ci_low": 0.1, "ci_high": 0.3}
    return {"baseline": {"balanced_accuracy": 0.5}, "augmented": {"balanced_accuracy": 0.6}, "verdict": "augmentation helped",
            "gain_over_baseline": gains, "recovered_share": share, "skipped": skipped or {}, "seeds": [0, 1]}


def test_verdict_lines_say_it_in_plain_words():
    lines = verdict_lines(_metrics({"value": 0.5, "ci_low": 0.2, "ci_high": 0.8, "defined": True, "note": None}))
    assert lines[0] == ("Synthetic images from the fine-tuned models (augmented): balanced accuracy 0.500 -> 0.600, "
                        "gain +0.100 (95% CI +0.020 .. +0.180): augmentation helped.")
    assert "without fine-tuning (base_only): gain -0.040 (95% CI -0.100 .. +0.010), not distinguishable from 0." in lines[1]
    assert "extra real images per class (real_ceiling): gain +0.200 (95% CI +0.100 .. +0.300), clearly above 0." in lines[2]
    assert lines[3] == "The synthetic images recover 50% of the real images' gain (95% CI 20% .. 80%)."
    assert len(lines) == 4  # several seeds: no caveat
    one_seed = {**_metrics({"value": 0.5, "ci_low": 0.2, "ci_high": 0.8, "defined": True, "note": None}), "seeds": [0]}
    assert verdict_lines(one_seed)[4].startswith("One classifier seed: the intervals cover test-image sampling only")
    reason = skip_reason(micro_params(), "real_ceiling")
    lines = verdict_lines(_metrics({"value": None, "ci_low": None, "ci_high": None, "defined": False,
                                    "note": f"no real_ceiling variant: {reason}"}, skipped={"real_ceiling": reason}))
    assert lines[2].endswith("(real_ceiling): not run, data.real_per_class is null: every real train image is already "
                             "used, so no reserve is left for a ceiling.")
    assert lines[3].startswith("Share of the real images' gain that the synthetic images recover: undefined, no real_ceiling")


# ----------------------------------------------------------------------------- the variants' training images

def test_variant_training_samples(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws", counts=(3, 1, 1), reserve=5, synthetic=3)
    monkeypatch.chdir(root)
    params = micro_params(real_per_class=3, per_class=2)
    split = read_split(params, root)
    baseline = training_samples(params, "baseline", split, root)
    train_ids = set(split.loc[split["split"] == "train", "image_id"])
    assert {s.image_id for s in baseline} == train_ids and len(baseline) == 3 * len(CLASSES)

    base_only = training_samples(params, "base_only", split, root)
    extra = base_only[len(baseline):]
    assert base_only[: len(baseline)] == baseline and len(extra) == 3 * len(CLASSES)
    assert all(s.origin == "synthetic" and "data/synthetic_base/" in s.path.as_posix() for s in extra)
    assert_no_leakage(base_only, split, allow_synthetic=True)
    with pytest.raises(PipelineError, match="leakage guard: synthetic image .*synthetic_base"):
        assert_no_leakage(base_only, split, allow_synthetic=False)

    ceiling = training_samples(params, "real_ceiling", split, root)
    extra = ceiling[len(baseline):]
    reserve_ids = set(split.loc[split["split"] == "reserve", "image_id"])
    assert all(s.origin == "real" and s.image_id in reserve_ids for s in extra)
    assert pd.Series([s.label for s in extra]).value_counts().to_dict() == {0: 2, 1: 2, 2: 2}  # generate.per_class each
    assert training_samples(params, "real_ceiling", split, root) == ceiling  # a seeded draw
    other_seed = training_samples(params.model_copy(update={"seed": 1}), "real_ceiling", split, root)
    assert {s.image_id for s in other_seed} != {s.image_id for s in ceiling}
    assert_no_leakage(ceiling, split, allow_synthetic=False)
    other_draw = training_samples(params, "real_ceiling", split, root, draw=1)  # classifier seed 1 redraws the reserve
    assert len(other_draw) == len(ceiling) and {s.image_id for s in other_draw} != {s.image_id for s in ceiling}
    big = micro_params(real_per_class=3, per_class=50)  # more than the reserve holds: all of it
    assert len(training_samples(big, "real_ceiling", split, root)) == len(baseline) + 5 * len(CLASSES)

    for variant in ("augmented", "base_only"):  # each classifier seed trains on its own draw of synthetic images
        draws = [{s.path for s in training_samples(params, variant, split, root, draw=d)} - {s.path for s in baseline}
                 for d in (0, 1)]
        assert len(draws[0]) == len(draws[1]) > 0 and not draws[0] & draws[1]
    with pytest.raises(PipelineError, match=r"manifest.csv: no image drawn for classifier seed 7; rerun generate@bcc"):
        training_samples(params, "augmented", split, root, draw=7)

    oracle = training_samples(params, "oracle", split, root)
    assert len(oracle) == len(baseline) + 5 * len(CLASSES) and {s.origin for s in oracle} == {"real"}
    train_side = set(split.loc[split["split"].isin(["train", "reserve"]), "image_id"])
    assert {s.image_id for s in oracle} == train_side  # every train and reserve row, nothing else
    val_row = split[split["split"] == "val"].iloc[0]
    leaked = [*ceiling, type(ceiling[0])(ceiling[0].path.parent / val_row["path"].split("/")[-1], 0, "real",
                                         val_row["image_id"])]
    with pytest.raises(PipelineError, match="leakage guard: val image"):
        assert_no_leakage(leaked, split, allow_synthetic=False)


def test_real_ceiling_is_skipped_without_a_reserve(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(root)
    params = micro_params()  # data.real_per_class: null
    assert skip_reason(params, "real_ceiling").startswith("data.real_per_class is null")
    assert skip_reason(params, "base_only") is None and skip_reason(micro_params(real_per_class=4), "real_ceiling") is None
    report = train_variant(params, "real_ceiling")
    assert report["skipped"] == skip_reason(params, "real_ceiling")
    assert json.loads((root / "reports/train/real_ceiling.json").read_text()) == report
    assert json.loads((root / "models/classifier/real_ceiling/config.json").read_text())["skipped"] == report["skipped"]
    assert not list((root / "models/classifier/real_ceiling").glob("*.safetensors"))


# ----------------------------------------------------------------------------- class fidelity

def test_fidelity_numbers_on_a_hand_made_set():
    classes = ["a", "b"]
    labels = np.array([0, 0, 0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.5, 0.5001], [0.0, 1.0]])
    scores = own_class_scores(labels, proba, classes)
    assert scores["a"] == pytest.approx({"share_own_class": 0.5, "mean_p_own_class": 0.5, "images": 4})
    assert scores["b"] == pytest.approx({"share_own_class": 1.0, "mean_p_own_class": 0.75005, "images": 2})
    test = own_class_scores(np.array([0, 0, 1, 1]), np.array([[1, 0], [0, 1], [0, 1], [0, 1.0]]), classes)
    base = own_class_scores(labels, proba[:, ::-1], classes)
    table = fidelity_table(test, {"augmented": scores, "base_only": base}, classes)
    assert table["classes"]["a"]["oracle_test_recall"] == 0.5 and table["classes"]["b"]["oracle_test_recall"] == 1.0
    assert table["classes"]["a"]["augmented"]["share_own_class"] == 0.5
    assert table["mean"]["augmented"] == pytest.approx({"share_own_class": 0.75, "mean_p_own_class": (0.5 + 0.75005) / 2})
    assert table["mean"]["base_only"]["share_own_class"] == pytest.approx(0.25)
    assert table["fine_tuning_adds"] == pytest.approx(0.5) and table["mean"]["oracle_test_recall"] == 0.75
    assert table["warnings"] == ["a: the oracle recognises only 50% of the real test images (chance 50%), so its "
                                 "fidelity figures for a say little"]
    lines = fidelity_lines(table)
    assert lines[0] == ("Class fidelity: an oracle classifier trained on every real train image assigns 75% of the "
                        "fine-tuned models' images and 25% of the base model's images (class prompt, no fine-tuning) "
                        "to their own class, and 75% of real test images (its recall).")
    assert lines[1].startswith("Warning: a: the oracle recognises only 50%")
    table["oracle"] = {"judges": {"0": {"augmented": 0.7}, "1": {"augmented": 0.834}}}
    assert fidelity_lines(table)[1] == ("The oracle averages 2 judges (oracle.seeds); alone, they assign 70%, 83% of "
                                        "the fine-tuned models' images to their own class.")
    with pytest.raises(PipelineError, match="no synthetic image of class 'b'"):
        fidelity_table(test, {"augmented": {"a": scores["a"]}}, classes)


def test_oracle_and_fidelity_stages_at_micro_settings(tmp_path, monkeypatch):
    root = make_workspace(tmp_path / "ws", counts=(4, 2, 2), reserve=2)
    monkeypatch.chdir(root)
    params = micro_params(real_per_class=4, seeds=[1, 0])
    params = params.model_copy(update={"oracle": params.oracle.model_copy(update={"seeds": [2, 1]})})
    write_params(root, params)
    assert run_stage("oracle", train_oracle, argv=[]) == 0
    trained = json.loads((root / "reports/train/oracle.json").read_text())
    assert trained["train_real"] == (4 + 2) * len(CLASSES) and trained["train_synthetic"] == 0  # train + reserve rows
    assert set(trained["seeds"]) == {"2", "1"}  # one judge per oracle seed, whatever classifier.seeds holds
    assert run_stage("fidelity", score_fidelity, argv=[]) == 0
    table = json.loads((root / FIDELITY_JSON).read_text())
    assert set(table["classes"]) == set(CLASSES) and table["oracle"]["seeds"] == [2, 1]
    assert table["oracle"]["image_size"] == 32 and table["oracle"]["test_images"] == 6
    # The verdict is the judges' averaged probabilities; each judge alone is reported beside it.
    test = real_samples(read_split(params, root), "test")
    labels, images = np.array([s.label for s in test]), load_images([s.path for s in test], 32)
    proba = [predict_proba(load_classifier(root / "models/classifier/oracle", seed, CLASSES), images) for seed in (2, 1)]
    averaged = own_class_scores(labels, (proba[0] + proba[1]) / 2, CLASSES)
    assert {c: e["oracle_test_recall"] for c, e in table["classes"].items()} == {
        c: v["share_own_class"] for c, v in averaged.items()}
    for seed, p in zip(("2", "1"), proba):
        recall = np.mean([v["share_own_class"] for v in own_class_scores(labels, p, CLASSES).values()])
        assert table["oracle"]["judges"][seed]["test"] == pytest.approx(recall)
    assert set(table["oracle"]["judges"]["2"]) == {"test", "augmented", "base_only"}
    for entry in table["classes"].values():
        assert entry["test_images"] == 2 and 0 <= entry["oracle_test_recall"] <= 1
        for source in ("augmented", "base_only"):
            assert entry[source]["images"] == 8  # every draw is scored: 4 for each of the classifier seeds 0 and 1
            assert 0 <= entry[source]["share_own_class"] <= 1 and 0 < entry[source]["mean_p_own_class"] < 1
    import mlflow

    runs = mlflow.search_runs(experiment_names=["lesion-synth"], filter_string="tags.stage = 'fidelity'")
    assert len(runs) == 1 and runs["metrics.fidelity_augmented_mean"].iloc[0] == pytest.approx(
        table["mean"]["augmented"]["share_own_class"])
    # The oracle never trains on a val/test image: a reserve row that is really a test image is refused.
    split = pd.read_csv(root / "data/prepared/split.csv")
    split.loc[split.index[split["split"] == "reserve"][0], "image_id"] = split.loc[split["split"] == "test", "image_id"].iloc[0]
    split.to_csv(root / "data/prepared/split.csv", index=False)
    with pytest.raises(PipelineError, match="leakage guard: test image"):
        train_oracle(params)


# ----------------------------------------------------------------------------- the base_only control's images

def test_generate_base_draws_the_class_prompt_from_the_base_model_alone(tmp_path, monkeypatch):
    """No class model exists at all: the images are the base pipeline's, with the class's prompt and image seeds."""
    import csv

    from diffusion_workspace import build_base, pixels
    from diffusion_workspace import make_workspace as make_diffusion_workspace
    from diffusion_workspace import micro_params as diffusion_params

    from pipeline.diffusion.base import load_base_pipeline
    from pipeline.diffusion.generate import Sampling, generate_class, generate_images, image_seed, make_scheduler
    from pipeline.core.digest import sha256_file
    from pipeline.core.paths import WORKSPACE_ENV

    root = make_diffusion_workspace(tmp_path / "ws", build_base(tmp_path / "base"))
    monkeypatch.chdir(root)
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    params = diffusion_params(generate={"per_class": 2})
    folder = generate_class(params, "vasc", base_only=True)
    assert folder == root / "data/synthetic_base/vasc" and not (root / "data/synthetic").exists()
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    seeds = [image_seed(params.seed, "vasc", k) for k in range(2)]
    assert [int(r["seed"]) for r in rows] == seeds and {r["prompt"] for r in rows} == {params.class_prompt("vasc")}
    assert {r["weights_sha256"] for r in rows} == {sha256_file(root / "models/base/unet/diffusion_pytorch_model.safetensors")}
    pipe = load_base_pipeline(root / "models/base")
    pipe.scheduler = make_scheduler(params.generate.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    sampling = Sampling(params.generate.steps, params.generate.guidance, params.diffusion.resolution)
    expected = generate_images(pipe, params.class_prompt("vasc"), "", seeds, sampling)
    for row, image in zip(rows, expected):
        assert np.abs(pixels(folder / row["file"]) - np.asarray(image, dtype=np.int16)).max() <= 1
