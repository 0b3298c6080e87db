"""Distribution metrics between a real and a synthetic feature set (rows = images), on the features' device.

FID and KID are torchmetrics'. k-NN precision/recall and coverage (Kynkaenniemi et al. 2019, Naeem et al. 2020) are
our own, as no library we use computes them on given features.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

_CHUNK = 1024  # rows per block of pairwise distances, bounding memory to ~_CHUNK * n * 8 bytes


def _identity(width: int) -> torch.nn.Module:
    """Feature rows as torchmetrics' ``feature`` module; ``num_features`` spares FID probing it with a dummy image."""
    identity = torch.nn.Identity()
    identity.num_features = width
    return identity


def _pair(real, fake, minimum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 (samples, features) on real's device; ValueError when a metric cannot use them."""
    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    for name, x in (("real", real), ("fake", fake)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"needs at least {minimum} samples per set, got real {len(real)}, fake {len(fake)}")
    return real, fake.to(real.device)


def _span_coordinates(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in an orthonormal basis of their centred rows' span: exact for FID (unchanged by translation and
    rotation; every mean and covariance lies in the span), and its eigen-solve shrinks from (d x d) to (n x n)."""
    centre = torch.cat([real, fake]).mean(dim=0)
    rows = torch.cat([real, fake]) - centre
    if rows.shape[0] >= rows.shape[1]:
        return real - centre, fake - centre
    basis, _ = torch.linalg.qr(rows.T)  # (d, n_real + n_fake), orthonormal columns
    return (real - centre) @ basis, (fake - centre) @ basis


def frechet_distance(real, fake) -> float:
    """FID between two feature sets (each needs >= 2 samples): about 0 for identical sets."""
    real, fake = _span_coordinates(*_pair(real, fake, 2))
    metric = FrechetInceptionDistance(feature=_identity(real.shape[1])).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_inception_distance(real, fake, subset_size: int = 50, subsets: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``subset_size`` samples (at most every sample) per set."""
    real, fake = _pair(real, fake, 2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID stores all features": a few hundred rows here
        metric = KernelInceptionDistance(feature=_identity(real.shape[1]), subsets=subsets, subset_size=size)
    metric = metric.to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the CPU generator: seed it, restore it after
        torch.default_generator.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def knn_radii(x, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample (the radius of its k-NN ball); needs 0 < k < n."""
    x = torch.as_tensor(x).double()
    blocks = [torch.cdist(x[i : i + _CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), _CHUNK)]
    return torch.cat(blocks)  # k + 1: the nearest "other" sample after the sample itself


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """k-NN precision (share of synthetic samples inside the real manifold: the union of balls reaching each sample's
    k-th neighbour), recall (the reverse) and coverage (robust to outliers inflating recall); each set needs > k."""
    real, fake = _pair(real, fake, k + 1)
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_in_real = []
    real_in_fake = real_covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), _CHUNK):
        block = torch.cdist(fake[start : start + _CHUNK], real)  # (fake chunk, real)
        fake_in_real.append((block <= real_radii[None, :]).any(dim=1))
        real_in_fake = real_in_fake | (block <= fake_radii[start : start + _CHUNK, None]).any(dim=0)
        real_covered = real_covered | (block.min(dim=0).values <= real_radii)
    shares = {"precision": torch.cat(fake_in_real), "recall": real_in_fake, "coverage": real_covered}
    return {key: hits.double().mean().item() for key, hits in shares.items()}
