"""The evaluate stage: every classifier variant on the held-out *real* test split, and what the synthetic images bought.

Every evaluated variant (baseline, augmented, base_only, and real_ceiling when ``data.real_per_class`` leaves a
reserve) predicts the same test images with each seed of ``classifier.seeds``; metrics are mean ± std over seeds.
The augmented − baseline gain of every metric gets a 95% CI from a paired bootstrap (``gain``, ``gain_ci95``,
``verdict``); every variant's balanced-accuracy gain and the real ceiling's share that the synthetic images recover
come from the same resamples (metrics.py). Confusion outputs show baseline and augmented, first seed.

MLflow: one run per evaluated variant (``stages/evaluate.py`` runs with ``track=False``), a child of this
execution's parent run tagged ``stage=evaluate``, ``variant=<variant>`` and a shared ``evaluation_id``; it holds
the variant's test metrics, its ``gain_over_baseline`` (+ ``_ci95_low``/``_high``), the shared augmented gains,
``recovered_share`` where defined and the ``verdict`` tag. The latest evaluation, one row per variant:

    MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db} python -c "import mlflow; r = mlflow.search_runs(experiment_names=['lesion-synth'], filter_string=\"tags.stage = 'evaluate'\", order_by=['attributes.start_time DESC']); print(r[r['tags.evaluation_id'] == r['tags.evaluation_id'].iloc[0]][['tags.variant', 'metrics.balanced_accuracy', 'metrics.gain_over_baseline', 'tags.verdict', 'tags.mlflow.parentRunId']].to_string(index=False))"
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from pipeline.core import tracking
from pipeline.core.atomic import write_figure, write_json, write_text
from pipeline.classifier.dataset import assert_real_heldout, load_images, read_split, real_samples
from pipeline.classifier.metrics import (
    BASELINE,
    CEILING,
    SYNTHETIC,
    VERDICT_HELPED,
    VERDICT_HURT,
    VERDICT_UNSURE,
    ci95,
    classification_metrics,
    gains_over_baseline,
    mean_std,
    paired_draws,
    paired_gain,
    recovered_share,
    resample_indices,
    verdict,
)
from pipeline.classifier.model import load_classifier, predict_proba, read_config
from pipeline.classifier.train import CONTROL_VARIANTS, VARIANTS, skip_reason
from pipeline.core.errors import PipelineError
from pipeline.core.params import Params
from pipeline.core.paths import CLASSIFIER_DIR, PLOTS_DIR, REPORTS_DIR, SYNTHETIC_DIR, workspace_root

METRICS_JSON = REPORTS_DIR / "metrics.json"
CI_WORDS = {VERDICT_HELPED: "clearly above 0", VERDICT_HURT: "clearly below 0",
            VERDICT_UNSURE: "not distinguishable from 0"}


def confusion_csv(variant: str) -> Path:
    return PLOTS_DIR / f"confusion_{variant}.csv"


def confusion_png(variant: str) -> Path:
    return PLOTS_DIR / f"confusion_{variant}.png"


def plot_confusion(ax, matrix: np.ndarray, classes: list[str], title: str, normalize: bool = False) -> None:
    """Counts (or row-normalised recall) with class codes on both axes (true label down, predicted across); used here
    and by the report."""
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    ConfusionMatrixDisplay(shown, display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format=".2f" if normalize else "d", text_kw={"fontsize": 8},
        im_kw={"vmin": 0, "vmax": 1 if normalize else max(int(matrix.max()), 1)})
    ax.set_title(title, fontsize=10)


def _write_confusion(root: Path, variant: str, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                     title: str) -> None:
    from matplotlib.figure import Figure  # not pyplot: no backend to choose, no global figure to close

    table = pd.DataFrame({"actual": [classes[i] for i in y_true], "predicted": [classes[i] for i in y_pred]})
    write_text(root / confusion_csv(variant), table.to_csv(index=False, lineterminator="\n"))
    fig = Figure(figsize=(1.2 + 0.7 * len(classes), 1.0 + 0.7 * len(classes)))
    plot_confusion(fig.subplots(), confusion_matrix(y_true, y_pred, labels=range(len(classes))), classes, title)
    write_figure(root / confusion_png(variant), fig, dpi=120)


def _log_variant_runs(params: Params, metrics: dict, root: Path) -> None:
    """One MLflow run per variant, children of this execution's parent run."""
    import mlflow

    evaluation_id = uuid.uuid4().hex
    shared = {f"gain_{k}": v for k, v in metrics["gain"].items()}
    shared.update({f"gain_ci95_low_{k}": v["low"] for k, v in metrics["gain_ci95"].items()})
    shared.update({f"gain_ci95_high_{k}": v["high"] for k, v in metrics["gain_ci95"].items()})
    share = metrics["recovered_share"]
    if share["defined"]:
        shared.update(recovered_share=share["value"], recovered_share_ci95_low=share["ci_low"],
                      recovered_share_ci95_high=share["ci_high"])
    logged_params = tracking.flatten({"classifier": params.classifier.model_dump(mode="json"),
                                      "evaluate": params.evaluate.model_dump(mode="json")})
    for variant in metrics["variants"]:
        tags = {"stage": "evaluate", "variant": variant, "classes": ",".join(params.data.classes),
                "method": params.diffusion.method, "seed": ",".join(map(str, params.classifier.seeds)),
                "verdict": metrics["verdict"], "evaluation_id": evaluation_id}
        with tracking.stage_run(f"evaluate@{variant}", params, tags=tags):
            mlflow.log_params(logged_params)
            values = {**{k: v for k, v in metrics[variant].items() if isinstance(v, (int, float))}, **shared}
            if variant in metrics["gain_over_baseline"]:
                own = metrics["gain_over_baseline"][variant]
                values.update(gain_over_baseline=own["balanced_accuracy"], gain_over_baseline_ci95_low=own["ci_low"],
                              gain_over_baseline_ci95_high=own["ci_high"])
            tracking.log_metrics(values)
            for path in (confusion_png(variant), confusion_csv(variant)) if variant in VARIANTS else ():
                tracking.log_artifact(root / path, artifact_path="plots")
            tracking.log_artifact(root / METRICS_JSON)


def evaluate(params: Params) -> dict:
    """Predict the real test split with every seed of every variant; write reports/metrics.json and confusion plots,
    and log one MLflow run per variant. A failure marks the execution's parent run FAILED."""
    try:
        return _evaluate(params)
    except BaseException:
        with contextlib.suppress(Exception):  # as tracking.stage_run does; never hide the real error behind this one
            import mlflow

            mlflow.MlflowClient(tracking.tracking_uri()).set_terminated(tracking.parent_run_id(params), status="FAILED")
        raise


def verdict_lines(metrics: dict) -> list[str]:
    """The summary's first lines: what each variant's images bought over baseline, and how much of what real images
    buy the synthetic ones recover, in plain words (figures from reports/metrics.json)."""
    base = metrics[BASELINE]["balanced_accuracy"]
    gains = metrics["gain_over_baseline"]
    aug = gains[SYNTHETIC]
    lines = [f"Synthetic images from the fine-tuned models (augmented): balanced accuracy {base:.3f} -> "
             f"{metrics[SYNTHETIC]['balanced_accuracy']:.3f}, gain {aug['balanced_accuracy']:+.3f} "
             f"(95% CI {aug['ci_low']:+.3f} .. {aug['ci_high']:+.3f}): {metrics['verdict']}."]
    described = {"base_only": "The same number of images from the base model with the class prompt but without "
                              "fine-tuning (base_only)",
                 CEILING: "The same number of extra real images per class (real_ceiling)"}
    for variant, words in described.items():
        if variant in gains:
            g = gains[variant]
            lines.append(f"{words}: gain {g['balanced_accuracy']:+.3f} (95% CI {g['ci_low']:+.3f} .. "
                         f"{g['ci_high']:+.3f}), {CI_WORDS[verdict(g['ci_low'], g['ci_high'])]}.")
        elif variant in metrics.get("skipped", {}):
            lines.append(f"{words}: not run, {metrics['skipped'][variant]}.")
    share = metrics["recovered_share"]
    if share["defined"]:
        beyond = " (more than the real images themselves)" if share["value"] > 1 else ""
        lines.append(f"The synthetic images recover {share['value']:.0%} of the real images' gain{beyond} "
                     f"(95% CI {share['ci_low']:.0%} .. {share['ci_high']:.0%}).")
    else:
        lines.append(f"Share of the real images' gain that the synthetic images recover: undefined, {share['note']}.")
    if len(metrics["seeds"]) == 1:
        lines.append("One classifier seed: the intervals cover test-image sampling only, not the classifier's or the "
                     "generator's variance, which can move the verdict; several classifier.seeds redraw both.")
    return lines


def _evaluate(params: Params) -> dict:
    root = workspace_root()
    classes, seeds = list(params.data.classes), list(params.classifier.seeds)
    reasons = {v: skip_reason(params, v) for v in (*VARIANTS, *CONTROL_VARIANTS)}
    variants = [v for v, r in reasons.items() if r is None]
    skipped = {v: r for v, r in reasons.items() if r is not None}
    split = read_split(params, root)
    test = real_samples(split, "test")
    assert_real_heldout(test, split, "test", root / SYNTHETIC_DIR)  # runtime guard: real test rows only
    y_true = np.array([s.label for s in test])

    probas: dict[str, list[np.ndarray]] = {}
    for variant in variants:
        folder = root / CLASSIFIER_DIR / variant
        config = read_config(folder)
        if "skipped" in config:
            raise PipelineError(f"{folder}: train@{variant} was skipped ({config['skipped']}) but these params need it; "
                                f"run `dvc repro train@{variant}`")
        images = load_images([s.path for s in test], int(config["image_size"]))
        probas[variant] = [predict_proba(load_classifier(folder, seed, classes), images) for seed in seeds]

    per_seed = {v: [classification_metrics(y_true, p, classes) for p in probas[v]] for v in variants}
    gain = paired_gain(per_seed[BASELINE], per_seed[SYNTHETIC])
    indices = resample_indices(len(y_true), params.evaluate.bootstrap, params.seed)  # every interval's resamples
    draws = {v: paired_draws(y_true, probas[BASELINE], probas[v], classes, indices) for v in variants if v != BASELINE}
    ci = {k: ci95(d) for k, d in draws[SYNTHETIC].items() if k in gain and not np.isnan(d).all()}
    gains = gains_over_baseline(per_seed, draws)
    share = (recovered_share(gains, draws) if CEILING in gains else
             {"value": None, "ci_low": None, "ci_high": None, "defined": False, "note": f"no real_ceiling variant: {skipped[CEILING]}"})
    metrics = {
        **{v: {**mean_std(per_seed[v]), "n_test": len(test), "n_seeds": len(seeds)} for v in variants},
        "gain": gain,
        "gain_ci95": {k: {"low": lo, "high": hi} for k, (lo, hi) in ci.items()},
        "verdict": verdict(*ci["balanced_accuracy"]),
        "gain_over_baseline": gains,
        "recovered_share": share,
        "variants": variants,
        "skipped": skipped,
        "bootstrap": params.evaluate.bootstrap,
        "seeds": seeds,
        "test_counts": {c: int((y_true == i).sum()) for i, c in enumerate(classes)},
    }
    for variant in VARIANTS:
        y_pred = probas[variant][0].argmax(axis=1)
        ba = per_seed[variant][0]["balanced_accuracy"]
        _write_confusion(root, variant, y_true, y_pred, classes, f"{variant} (seed {seeds[0]}), balanced acc {ba:.3f}")
    write_json(root / METRICS_JSON, metrics)

    print("evaluate: " + "\n          ".join(verdict_lines(metrics)))
    _log_variant_runs(params, metrics, root)
    return metrics
