"""Classification metrics, their mean ± std over seeds, and the paired bootstraps of the gains.

Per-class recall/precision and every macro average run over the classes *present in y_true*, so a class missing
from a (resampled) test set never crashes or silently scores 0 (hence ``macro_recall`` equals ``balanced_accuracy``);
``auroc_macro`` is omitted with fewer than 2 classes present; a class never predicted has precision 0.

``resample_indices`` draws the evaluate stage's bootstrap resamples once and every interval comes from them
(scipy.stats.bootstrap would draw its own in each call, and needs one fixed-length statistic per resample, which a
resample missing a class has not). Within a resample seed k of a variant is paired with seed k of baseline and the
gains are averaged over seeds, so the interval covers the generator's variance as well as the classifier's.
``metric_arrays`` scores all resamples at once (1000 through scikit-learn's input validation take minutes); tests
check it against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

HEADLINE = ("balanced_accuracy", "macro_recall", "macro_f1", "auroc_macro", "accuracy")
VERDICT_HELPED = "augmentation helped"
VERDICT_HURT = "augmentation did not help"
VERDICT_UNSURE = "inconclusive at 95%"
BASELINE = "baseline"
SYNTHETIC = "augmented"
CEILING = "real_ceiling"


def metric_arrays(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Every metric along the image axis: y_true (..., n) and proba (..., n, classes), e.g. one row per resample.
    NaN where a metric is undefined (its class absent, AUROC with one class present)."""
    y_pred, n, k = proba.argmax(axis=-1), y_true.shape[-1], len(classes)
    actual, predicted = y_true[..., None] == np.arange(k), y_pred[..., None] == np.arange(k)  # (..., n, k)
    support, n_pred, hits = actual.sum(-2), predicted.sum(-2), (actual & predicted).sum(-2)  # (..., k)
    rank_sum = (rankdata(proba, axis=-2) * actual).sum(-2)  # AUROC is the Mann-Whitney U of the positives' ranks
    absent = support == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = hits / support
        precision = np.where(absent, np.nan, np.where(n_pred > 0, hits / n_pred, 0.0))
        f1 = 2 * hits / (support + n_pred)
        auroc = (rank_sum - support * (support + 1) / 2) / (support * (n - support))
    present = (~absent).sum(-1)

    def macro(values: np.ndarray) -> np.ndarray:  # the mean over the classes present
        return np.where(absent, 0.0, values).sum(-1) / present

    out = {"balanced_accuracy": macro(recall), "macro_recall": macro(recall), "macro_f1": macro(f1),
           "auroc_macro": np.where(present >= 2, macro(auroc), np.nan), "accuracy": (y_pred == y_true).mean(-1)}
    for c, name in enumerate(classes):
        out[f"recall_{name}"], out[f"precision_{name}"] = recall[..., c], precision[..., c]
    return out


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Flat metrics of one model on one test set: headline numbers plus ``recall_<class>`` / ``precision_<class>``."""
    return {k: float(v) for k, v in metric_arrays(y_true, proba, classes).items() if not np.isnan(v)}


def mean_std(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{metric: mean, metric_std: std}`` over seeds (sample std, 0 for a single seed); keys missing in any seed are dropped."""
    frame = pd.DataFrame(per_seed).dropna(axis=1)  # (seeds, metrics); a metric some seed lacks is NaN there
    return {**frame.mean().to_dict(), **frame.std().fillna(0.0).add_suffix("_std").to_dict()}


def paired_gain(base: Sequence[dict[str, float]], aug: Sequence[dict[str, float]]) -> dict[str, float]:
    """Point gain (augmented − baseline) per metric, averaged over seeds (seed k of one paired with seed k of the other)."""
    keys = [k for k in base[0] if all(k in m for m in (*base, *aug))]
    return {k: float(np.mean([a[k] - b[k] for a, b in zip(aug, base)])) for k in keys}


def paired_draws(y_true: np.ndarray, base_proba: Sequence[np.ndarray], other_proba: Sequence[np.ndarray],
                 classes: Sequence[str], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Gain (other − base) of every metric in each resample of ``indices``, averaged over the paired seeds; NaN in a
    resample that lacks the metric (a class's recall, AUROC with one class left)."""
    y = np.asarray(y_true)[indices]
    gains = []
    for base, other in zip(base_proba, other_proba, strict=True):
        b, o = metric_arrays(y, base[indices], classes), metric_arrays(y, other[indices], classes)
        gains.append({key: o[key] - b[key] for key in b})
    return {key: np.mean([g[key] for g in gains], axis=0) for key in gains[0]}


def ci95(draws: np.ndarray) -> tuple[float, float]:
    """95% percentile interval over the resamples where the gain is defined."""
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(low), float(high)


def verdict(low: float, high: float) -> str:
    """Read the 95% CI of the balanced-accuracy gain: above 0 helped, below 0 did not, straddling 0 is undecided."""
    if low > 0:
        return VERDICT_HELPED
    if high < 0:
        return VERDICT_HURT
    return VERDICT_UNSURE


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices into the test images, drawn with replacement: the evaluate stage's one bootstrap."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def gains_over_baseline(per_seed: dict[str, list[dict[str, float]]],
                        draws: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Balanced-accuracy gain over baseline of every variant in ``draws`` (``paired_draws``), with its 95% CI."""
    table = {}
    for variant, gains in draws.items():
        low, high = ci95(gains["balanced_accuracy"])
        point = paired_gain(per_seed[BASELINE], per_seed[variant])["balanced_accuracy"]
        table[variant] = {"balanced_accuracy": point, "ci_low": low, "ci_high": high}
    return table


def recovered_share(gains: dict[str, dict[str, float]], draws: dict[str, dict[str, np.ndarray]]) -> dict:
    """gain(augmented) / gain(real_ceiling) with a 95% CI from the same resamples. Undefined (value and CI None, with
    a note) unless the ceiling's gain is clearly above 0: a ratio to a gain that may be 0 or negative means nothing."""
    ceiling = gains[CEILING]
    if ceiling["ci_low"] <= 0:
        where = "includes 0" if ceiling["ci_high"] >= 0 else "lies below 0"
        return {"value": None, "ci_low": None, "ci_high": None, "defined": False,
                "note": f"the real images' own gain is not clearly above 0 (its 95% CI {where})"}
    synthetic, real = draws[SYNTHETIC]["balanced_accuracy"], draws[CEILING]["balanced_accuracy"]
    low, high = ci95(np.divide(synthetic, real, out=np.full_like(real, np.nan), where=real != 0))
    return {"value": gains[SYNTHETIC]["balanced_accuracy"] / ceiling["balanced_accuracy"], "ci_low": low,
            "ci_high": high, "defined": True, "note": None}
