"""Classification metrics (scikit-learn), their mean ± std over seeds, and the paired bootstraps of the gains.

Per-class recall/precision and every macro average run over the classes *present in y_true*, so a class missing
from a (resampled) test set never crashes or silently scores 0 (hence ``macro_recall`` equals ``balanced_accuracy``);
``auroc_macro`` is omitted with fewer than 2 classes present; a class never predicted has precision 0.

``resample_indices`` draws the evaluate stage's bootstrap resamples once and every interval comes from them
(scipy.stats.bootstrap would draw its own in each call, and needs one fixed-length statistic per resample, which a
resample missing a class has not). Within a resample seed k of a variant is paired with seed k of baseline and the
gains are averaged over seeds, so the interval covers the generator's variance as well as the classifier's. The
fast paths (``fast_metrics``, ``balanced_accuracy``) exist because 1000 resamples through scikit-learn's input
validation take minutes; tests check them against scikit-learn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

HEADLINE = ("balanced_accuracy", "macro_recall", "macro_f1", "auroc_macro", "accuracy")
VERDICT_HELPED = "augmentation helped"
VERDICT_HURT = "augmentation did not help"
VERDICT_UNSURE = "inconclusive at 95%"
BASELINE = "baseline"
SYNTHETIC = "augmented"
CEILING = "real_ceiling"


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Flat metrics of one model on one test set: headline numbers plus ``recall_<class>`` / ``precision_<class>``."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(proba).argmax(axis=1)
    labels = sorted(int(c) for c in np.unique(y_true))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" is expected and handled
        out = {
            "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
            "macro_recall": recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
            "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
            "accuracy": accuracy_score(y_true, y_pred),
        }
        recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
        precision = precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    if len(labels) >= 2:
        out["auroc_macro"] = float(np.mean([roc_auc_score(y_true == c, proba[:, c]) for c in labels]))
    for c, r, p in zip(labels, recall, precision):
        out[f"recall_{classes[c]}"] = r
        out[f"precision_{classes[c]}"] = p
    return {k: float(v) for k, v in out.items()}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: actual class, columns: predicted class, over all configured classes."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def fast_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """The numbers of ``classification_metrics`` from a bincount confusion matrix and rank-based AUROC."""
    k = len(classes)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(float)
    support, predicted, hits = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = np.flatnonzero(support > 0)
    recall = hits[present] / support[present]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted[present] > 0, hits[present] / predicted[present], 0.0)
        f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
    out = {
        "balanced_accuracy": recall.mean(),
        "macro_recall": recall.mean(),
        "macro_f1": f1.mean(),
        "accuracy": hits.sum() / len(y_true),
    }
    if len(present) >= 2:
        n = len(y_true)
        aucs = []
        for c in present:
            positives = y_true == c
            n_pos = support[c]
            ranks = rankdata(proba[:, c])
            aucs.append((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
        out["auroc_macro"] = float(np.mean(aucs))
    for i, c in enumerate(present):
        out[f"recall_{classes[c]}"] = recall[i]
        out[f"precision_{classes[c]}"] = precision[i]
    return {key: float(value) for key, value in out.items()}


def mean_std(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """``{metric: mean, metric_std: std}`` over seeds (sample std, 0 for a single seed); keys missing in any seed are dropped."""
    keys = [k for k in per_seed[0] if all(k in m for m in per_seed)]
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([m[key] for m in per_seed], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def paired_gain(base: Sequence[dict[str, float]], aug: Sequence[dict[str, float]]) -> dict[str, float]:
    """Point gain (augmented − baseline) per metric, averaged over seeds (seed k of one paired with seed k of the other)."""
    keys = [k for k in base[0] if all(k in m for m in (*base, *aug))]
    return {k: float(np.mean([a[k] - b[k] for a, b in zip(aug, base)])) for k in keys}


def paired_bootstrap(y_true: np.ndarray, base_proba: Sequence[np.ndarray], aug_proba: Sequence[np.ndarray],
                     classes: Sequence[str], indices: np.ndarray) -> dict[str, tuple[float, float]]:
    """95% percentile CI of the augmented gain for every metric over the resamples ``indices``; a resample lacking a
    metric (a class's recall, AUROC with one class left) is skipped for it."""
    y_true = np.asarray(y_true)
    base_pred = [p.argmax(axis=1) for p in base_proba]
    aug_pred = [p.argmax(axis=1) for p in aug_proba]
    draws: dict[str, list[float]] = {}
    for idx in indices:
        yb = y_true[idx]
        gains: dict[str, list[float]] = {}
        for bp, bpred, ap, apred in zip(base_proba, base_pred, aug_proba, aug_pred):
            mb = fast_metrics(yb, bpred[idx], bp[idx], classes)
            ma = fast_metrics(yb, apred[idx], ap[idx], classes)
            for key in mb.keys() & ma.keys():
                gains.setdefault(key, []).append(ma[key] - mb[key])
        for key, values in gains.items():
            draws.setdefault(key, []).append(float(np.mean(values)))
    return {key: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for key, v in sorted(draws.items())}


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


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean recall over the classes present in ``y_true``, along the last axis (so for many resamples at once)."""
    recalls = []
    for c in range(num_classes):
        actual = y_true == c
        support = actual.sum(axis=-1)
        hits = (actual & (y_pred == c)).sum(axis=-1)
        recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def bootstrap_gains(y_true: np.ndarray, preds: dict[str, list[np.ndarray]], num_classes: int,
                    indices: np.ndarray) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Balanced-accuracy gain over baseline, with its 95% CI over the resamples ``indices``, of every other variant in
    ``preds`` ({variant: predictions per seed, the same seeds in the same order}). Returns
    ({variant: {"balanced_accuracy", "ci_low", "ci_high"}}, {variant: the gain in each resample})."""
    seeds = len(preds[BASELINE])
    others = [v for v in preds if v != BASELINE]
    if any(len(preds[v]) != seeds for v in others):
        raise ValueError(f"every variant needs the baseline's {seeds} seed(s): {({v: len(p) for v, p in preds.items()})}")
    y_true = np.asarray(y_true)

    def gain(variant: str, rows=slice(None)) -> np.ndarray:
        """Seed-averaged gain of ``variant``, on the whole test set (rows: all) or in each resample."""
        y = y_true[rows]
        return np.mean([balanced_accuracy(y, np.asarray(p)[rows], num_classes)
                        - balanced_accuracy(y, np.asarray(b)[rows], num_classes)
                        for p, b in zip(preds[variant], preds[BASELINE])], axis=0)

    table, draws = {}, {}
    for variant in others:
        draws[variant] = gain(variant, indices)
        low, high = np.percentile(draws[variant], [2.5, 97.5])
        table[variant] = {"balanced_accuracy": float(gain(variant)), "ci_low": float(low), "ci_high": float(high)}
    return table, draws


def recovered_share(gains: dict[str, dict[str, float]], draws: dict[str, np.ndarray]) -> dict:
    """gain(augmented) / gain(real_ceiling) with a 95% CI from the same resamples. Undefined (value and CI None, with
    a note) unless the ceiling's gain is clearly above 0: a ratio to a gain that may be 0 or negative means nothing."""
    ceiling = gains[CEILING]
    if ceiling["ci_low"] <= 0:
        where = "includes 0" if ceiling["ci_high"] >= 0 else "lies below 0"
        return {"value": None, "ci_low": None, "ci_high": None, "defined": False,
                "note": f"the real images' own gain is not clearly above 0 (its 95% CI {where})"}
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(draws[CEILING] != 0, draws[SYNTHETIC] / draws[CEILING], np.nan)
    low, high = np.nanpercentile(ratio, [2.5, 97.5])
    return {"value": gains[SYNTHETIC]["balanced_accuracy"] / ceiling["balanced_accuracy"], "ci_low": float(low),
            "ci_high": float(high), "defined": True, "note": None}
