"""Memorization gate: is a synthetic image a (near-)copy of one of its class's fine-tuning images? A model fine-tuned
on 20 images can regurgitate them, and a copied patient image must not be published or counted as new data.

The nearest fine-tuning image by feature cosine is compared in pixels (SSIM). ``rule: both`` (default) needs both over
their thresholds, as either alone misfires here (same-vignette images reach a high SSIM; a small classifier puts many
same-class images close); ``either`` is stricter, with more false positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.params import MemorizationParams


@dataclass
class MemorizationResult:
    """One entry per synthetic image: index of the nearest reference image and the scores that decided the flag."""

    nn_index: np.ndarray  # int, into the reference (fine-tune) set
    nn_cosine: np.ndarray
    nn_ssim: np.ndarray
    memorized: np.ndarray  # bool


def cosine_matrix(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(n_queries, n_references) cosine similarities of feature rows."""
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    r = torch.nn.functional.normalize(references.double(), dim=1)
    return (q @ r.T).clamp(-1.0, 1.0)


def pair_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of a[i] vs b[i] for uint8 (n, 3, H, W) images of the same size (data range [0, 1]), on a's device."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(a.shape[2], a.shape[3])
    kernel = 11 if side >= 11 else max(3, side - (side % 2 == 0))  # the kernel must fit inside the image
    x, y = a.float() / 255.0, b.to(a.device).float() / 255.0  # float32: 10x faster than float64 on a CPU, error ~1e-6
    values = structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel, reduction="none")
    return values.reshape(len(a)).double()


def flag(cosine: np.ndarray, ssim: np.ndarray, params: MemorizationParams) -> np.ndarray:
    over_cos, over_ssim = cosine >= params.cosine, ssim >= params.ssim
    return over_cos & over_ssim if params.rule == "both" else over_cos | over_ssim


def check_memorization(synthetic_features: torch.Tensor, synthetic_pixels: torch.Tensor,
                       reference_features: torch.Tensor, reference_pixels: torch.Tensor,
                       params: MemorizationParams) -> MemorizationResult:
    """Nearest reference image by feature cosine for each synthetic image, that pair's SSIM, and the flag."""
    if len(synthetic_features) == 0:
        return MemorizationResult(np.empty(0, dtype=int), np.empty(0), np.empty(0), np.empty(0, dtype=bool))
    nn_cosine, nn_index = cosine_matrix(synthetic_features, reference_features.to(synthetic_features.device)).max(dim=1)
    nearest = reference_pixels.to(synthetic_pixels.device)[nn_index.to(synthetic_pixels.device)]
    nn_ssim = pair_ssim(synthetic_pixels, nearest).cpu().numpy()
    nn_cosine, nn_index = nn_cosine.cpu().numpy(), nn_index.cpu().numpy()
    return MemorizationResult(nn_index, nn_cosine, nn_ssim, flag(nn_cosine, nn_ssim, params))
