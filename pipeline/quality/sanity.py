"""Which quality figures cannot be read as plain numbers, and why: the per-class ``flags`` of reports/quality.json.

A figure is flagged when it was not computed, is NaN or infinite, is negative beyond round-off or
sampling noise, rests on fewer images than configured, or lies beyond a sanity bound: an FID more than
``quality.sanity_factor`` times the FID between two halves of the class's real images says the feature
space, not the images, decides the number. A median nearest-neighbour cosine at or above the memorization
threshold is flagged too: then the cosine half of the gate cannot tell a copy from a sibling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FIGURES = ("fid", "fid_kept", "kid_mean", "kid_std", "precision", "recall", "coverage", "median_nn_cosine")


@dataclass
class Bounds:
    """What one class's figures are checked against."""

    fid_real_vs_real: float | None  # FID between two sets of real train images
    kid_real_vs_real: float | None  # KID between the same two sets: zero up to sampling noise
    kid_subset_used: int  # images per KID subset actually drawn
    kid_subset_size: int  # quality.kid_subset_size
    sanity_factor: float  # quality.sanity_factor
    memorization_cosine: float  # quality.memorization.cosine
    n_real: int
    n_synthetic: int


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def out_of_range(figures: dict[str, float | None], bounds: Bounds) -> dict[str, str]:
    """{figure key: one-line reason} for every figure of ``figures`` that must not be shown as a plain number."""
    reasons: dict[str, list[str]] = {}

    def add(key: str, why: str) -> None:
        reasons.setdefault(key, []).append(why)

    for key in FIGURES:
        value = figures.get(key)
        if value is None:
            if key != "fid_kept" or figures.get("n_kept", 1):
                add(key, f"not computed: too few images ({bounds.n_real} real, {bounds.n_synthetic} synthetic)")
        elif not _finite(value):
            add(key, f"{value} is not finite")
    reference = bounds.fid_real_vs_real
    for key in ("fid", "fid_kept"):
        value = figures.get(key)
        if not _finite(value):
            continue
        if value < -1e-6 * (1.0 + abs(reference or 0.0)):
            add(key, f"{value:.4g} is negative beyond round-off")
        elif _finite(reference) and reference > 0 and value > bounds.sanity_factor * reference:
            add(key, f"{value:.4g} is {value / reference:.0f}x the real-vs-real FID {reference:.4g} "
                     f"(bound: quality.sanity_factor {bounds.sanity_factor:g}x)")
    mean, std = figures.get("kid_mean"), figures.get("kid_std")
    # Noise: the spread over subsets, or real-vs-real's distance from 0 where subsets overlap too much to show it.
    noise = max(std, abs(bounds.kid_real_vs_real)) if _finite(std) and _finite(bounds.kid_real_vs_real) else std
    if _finite(mean) and _finite(noise) and mean < -(2.0 * noise + 1e-9):
        add("kid_mean", f"{mean:.3g} is negative beyond sampling noise ({noise:.2g})")
    if _finite(mean) and bounds.kid_subset_used < bounds.kid_subset_size:
        add("kid_mean", f"subsets of {bounds.kid_subset_used} images, fewer than quality.kid_subset_size {bounds.kid_subset_size}")
    cosine = figures.get("median_nn_cosine")
    if _finite(cosine) and cosine >= bounds.memorization_cosine:
        add("median_nn_cosine", f"{cosine:.4f} >= quality.memorization.cosine {bounds.memorization_cosine}: "
                                "the cosine cannot tell a copy from a sibling")
    return {key: "; ".join(why) for key, why in reasons.items()}
