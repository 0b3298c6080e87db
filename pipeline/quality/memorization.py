"""Memorization / privacy gate: is a synthetic image a (near-)copy of one of its class's fine-tuning images?

A diffusion model fine-tuned on 20 images can regurgitate them (Somepalli et al. 2023, Carlini
et al. 2023); a copied patient image must not be published or counted as "new" training data.

For every synthetic image we find the fine-tuning image of its class with the highest *centred*
feature cosine, then measure the pixel SSIM of that one pair (both images centre-cropped and
resized to the same size). The rule (``quality.memorization``):

- ``rule: both`` (default): memorized when cosine >= tau_cos AND ssim >= tau_ssim. A copy is close
  in both spaces; either signal alone misfires on this data (smooth dermoscopy images with the
  same vignette reach a high SSIM, and a small classifier's features put many same-class images
  close together).
- ``rule: either``: memorized when cosine >= tau_cos OR ssim >= tau_ssim (stricter privacy gate,
  more false positives).

Features are centred on the class's real-train mean before the cosine: penultimate activations
are non-negative after pooling, so raw cosines of any two images sit near 1 and would not tell a
copy from a sibling. An exact copy still scores exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.params import MemorizationParams


@dataclass
class MemorizationResult:
    """One entry per synthetic image: index of the nearest reference image and the scores that decided the flag."""

    nn_index: np.ndarray  # int, into the reference (fine-tune) set
    nn_cosine: np.ndarray
    nn_ssim: np.ndarray
    memorized: np.ndarray  # bool


def centred_cosine(queries: np.ndarray, references: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """(n_queries, n_references) cosine similarities after subtracting ``centre`` from both sides."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    if centre is not None:
        q, r = q - centre, r - centre
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return np.clip(q @ r.T, -1.0, 1.0)


def pair_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of a[i] vs b[i] for uint8 (n, H, W, 3) arrays of the same size (RGB, data range [0, 1])."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of the same size, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return np.empty(0)
    side = min(a.shape[1], a.shape[2])
    kernel = 11 if side >= 11 else max(3, side - (side % 2 == 0))  # the kernel must fit inside the image
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255.0
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255.0
    values = structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel, reduction="none")
    return values.reshape(len(a)).numpy()


def flag(cosine: np.ndarray, ssim: np.ndarray, params: MemorizationParams) -> np.ndarray:
    """Apply the memorization rule (see module docstring) to score arrays."""
    over_cos = np.asarray(cosine) >= params.cosine
    over_ssim = np.asarray(ssim) >= params.ssim
    return over_cos & over_ssim if params.rule == "both" else over_cos | over_ssim


def check_memorization(
    synthetic_features: np.ndarray,
    synthetic_pixels: np.ndarray,
    reference_features: np.ndarray,
    reference_pixels: np.ndarray,
    params: MemorizationParams,
    centre: np.ndarray | None = None,
) -> MemorizationResult:
    """Nearest reference image by centred cosine for each synthetic image, that pair's SSIM, and the flag."""
    if len(reference_features) == 0:
        raise ValueError("the memorization check needs at least one reference (fine-tuning) image")
    n = len(synthetic_features)
    if n == 0:
        empty = np.empty(0)
        return MemorizationResult(np.empty(0, dtype=int), empty, empty, np.empty(0, dtype=bool))
    cosine = centred_cosine(synthetic_features, reference_features, centre)
    nn_index = cosine.argmax(axis=1)
    nn_cosine = cosine[np.arange(n), nn_index]
    nn_ssim = pair_ssim(np.asarray(synthetic_pixels), np.asarray(reference_pixels)[nn_index])
    return MemorizationResult(nn_index, nn_cosine, nn_ssim, flag(nn_cosine, nn_ssim, params))
