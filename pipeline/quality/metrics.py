"""Distribution metrics between a real and a synthetic feature set (rows = images, columns = features).

Torch on the features' device, independent of the feature extractor, testable on hand-made tensors:

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018): torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``, fed our features through ``PrecomputedFeatures``.
- Precision / recall (Kynkaenniemi et al. 2019) and coverage (Naeem et al. 2020): our own code, because no
  library we depend on computes k-NN manifold precision/recall (torch-fidelity's needs its own Inception).
  Each set's manifold is the union of balls reaching each sample's k-th nearest neighbour; precision =
  share of synthetic samples inside the real manifold, recall = share of real samples inside the synthetic
  one; coverage is robust to synthetic outliers inflating recall.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

_CHUNK = 1024  # rows per block of pairwise distances, bounding memory to ~_CHUNK * n * 8 bytes


class PrecomputedFeatures(torch.nn.Module):
    """The identity on (n, d) feature rows, as the ``feature`` module of torchmetrics' FID/KID.

    ``num_features`` tells FID the width, so it does not probe the module with a dummy image.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (samples, features) tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _pair(real, fake, minimum: int) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"needs at least {minimum} samples per set, got real {len(real)}, fake {len(fake)}")
    return real, fake.to(real.device)


def _span_coordinates(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in an orthonormal basis of the span of their rows minus a common centre (<= n_real + n_fake dims).

    FID is unchanged by a translation and a rotation of the feature space, and every mean and covariance
    lies in that span, so this is exact; it lets FID's eigen-solve run on at most (n x n) instead of (d x d).
    """
    centre = torch.cat([real, fake]).mean(dim=0)
    rows = torch.cat([real, fake]) - centre
    if rows.shape[0] >= rows.shape[1]:
        return real - centre, fake - centre
    basis, _ = torch.linalg.qr(rows.T)  # (d, n_real + n_fake), orthonormal columns
    return (real - centre) @ basis, (fake - centre) @ basis


def frechet_distance(real, fake) -> float:
    """FID between two feature sets (each needs >= 2 samples): about 0 for identical sets."""
    real, fake = _pair(real, fake, 2)
    real, fake = _span_coordinates(real, fake)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1])).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_inception_distance(real, fake, subset_size: int = 50, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``subset_size`` samples (at most every sample) per set."""
    real, fake = _pair(real, fake, 2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID stores all features": a few hundred rows here
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric = metric.to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the CPU generator: seed it, restore it after
        torch.default_generator.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def knn_radii(x, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample (the radius of its k-NN ball)."""
    x = _as_features(x, "x")
    if not 0 < k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} samples, got {k}")
    blocks = [torch.cdist(x[start : start + _CHUNK], x).kthvalue(k + 1, dim=1).values for start in range(0, len(x), _CHUNK)]
    return torch.cat(blocks)  # k + 1: the nearest "other" sample after the sample itself


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """k-NN precision, recall and coverage; each set needs > k samples."""
    real, fake = _pair(real, fake, k + 1)
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    real_covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), _CHUNK):
        block = torch.cdist(fake[start : start + _CHUNK], real)  # (fake chunk, real)
        fake_in_real[start : start + _CHUNK] = (block <= real_radii[None, :]).any(dim=1)
        real_in_fake |= (block <= fake_radii[start : start + _CHUNK, None]).any(dim=0)
        real_covered |= block.min(dim=0).values <= real_radii
    return {
        "precision": fake_in_real.double().mean().item(),
        "recall": real_in_fake.double().mean().item(),
        "coverage": real_covered.double().mean().item(),
    }
