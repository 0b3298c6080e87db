"""Every variant's balanced-accuracy gain over baseline from one paired bootstrap, and the share of the real-image
ceiling's gain that the synthetic images recover.

``resample_indices`` draws the bootstrap's resamples of the test images once; every interval of the evaluate stage
comes from them (here, and every metric's augmented gain in ``metrics.paired_bootstrap``). scipy.stats.bootstrap
would draw its own resamples in each call, so the intervals would not share them. Within a resample each (variant,
seed) gets its balanced accuracy (vectorised over resamples), seed k of a variant is paired with seed k of
baseline, and the gains are averaged over seeds; the 95% CI is the percentile interval. Several seeds, each with
its own synthetic images and classifier, therefore widen the interval by the generator's variance as well as the
classifier's. The recovered share gain(augmented) / gain(real_ceiling) is computed on those same resamples.
"""

from __future__ import annotations

import numpy as np

BASELINE = "baseline"
SYNTHETIC = "augmented"
CEILING = "real_ceiling"


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
    """Balanced-accuracy gain over baseline of every other variant in ``preds`` ({variant: predictions per seed, the
    same seeds in the same order}), with its 95% CI over the resamples ``indices`` (``resample_indices``).

    Returns ({variant: {"balanced_accuracy", "ci_low", "ci_high"}}, {variant: the gain in each resample}).
    """
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
