"""Classification metrics (scikit-learn), their mean ± std over seeds, and the paired bootstrap of the gain.

Conventions, chosen so a class missing from a (resampled) test set never crashes or silently scores 0:
- per-class recall/precision and every macro average run over the classes *present in y_true*;
  hence ``macro_recall`` equals ``balanced_accuracy`` by definition (both are reported because both names are used);
- ``auroc_macro`` is the mean one-vs-rest AUROC over present classes, omitted when fewer than 2 are present;
- precision of a class that is never predicted is 0 (scikit-learn's zero_division=0).
Own code, kept where no library computes the same thing:
- ``fast_metrics``: the numbers of ``classification_metrics`` from one bincount (checked against scikit-learn in
  tests), because 1000 resamples × seeds × 2 variants through scikit-learn's input validation take minutes;
- ``paired_bootstrap``: ``scipy.stats.bootstrap`` needs one fixed-length statistic per resample, but a resample
  that misses a class has no ``recall_<class>`` (and with one class left, no AUROC), so those draws are skipped.
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


def paired_bootstrap(
    y_true: np.ndarray,
    base_proba: Sequence[np.ndarray],
    aug_proba: Sequence[np.ndarray],
    classes: Sequence[str],
    indices: np.ndarray,
) -> dict[str, tuple[float, float]]:
    """95% percentile CI of the gain for every metric over the resamples ``indices`` (``gains.resample_indices``): the
    same test images for both variants and all seeds (paired), the per-seed gains averaged within each resample."""
    if len(base_proba) != len(aug_proba):
        raise ValueError("baseline and augmented need the same seeds")
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
