"""Distribution metrics between a real and a synthetic feature set (rows = images, columns = features).

Plain numpy so they are testable on hand-made arrays and independent of the feature extractor:

- FID (Heusel et al. 2017): ||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2).
  The trace of the matrix square root is computed exactly as the nuclear norm of A_r A_f^T
  (A = centred samples / sqrt(n-1)), which avoids ``scipy.linalg.sqrtm`` on the singular
  covariances we always have here (100 images, 1280 features) and its complex round-off.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets; returns mean and std.
- Precision / recall (Kynkaenniemi et al. 2019): each set's manifold is the union of balls
  reaching each sample's k-th nearest neighbour; precision = share of synthetic samples inside
  the real manifold, recall = share of real samples inside the synthetic one. Coverage
  (Naeem et al. 2020) is added because it is robust to synthetic outliers inflating recall.
"""

from __future__ import annotations

import math

import numpy as np

_CHUNK = 1024  # rows per block of pairwise distances, bounding memory to ~_CHUNK * n * 8 bytes


def _as_features(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (samples, features) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _pair(real, fake, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"need at least {minimum} samples per set, got real {len(real)}, fake {len(fake)}")
    return real, fake


def _covariance_factor(x: np.ndarray) -> np.ndarray:
    """A with A^T A = the sample covariance; reduced to its d x d R factor when there are more samples than features."""
    a = (x - x.mean(axis=0)) / math.sqrt(len(x) - 1)
    if a.shape[0] > a.shape[1]:
        a = np.linalg.qr(a, mode="r")
    return a


def frechet_distance(real, fake) -> float:
    """FID between two feature sets (each needs >= 2 samples); 0 for identical sets."""
    real, fake = _pair(real, fake, 2)
    diff = real.mean(axis=0) - fake.mean(axis=0)
    a, b = _covariance_factor(real), _covariance_factor(fake)
    # tr sqrt(S_r S_f) = sum of singular values of A B^T, exactly (eigenvalues of S_r S_f are sigma^2).
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    value = diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * cross
    return float(max(value, 0.0))  # round-off can give -1e-12 for identical sets


def kernel_inception_distance(
    real, fake, subset_size: int = 50, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of min(subset_size, n_real, n_fake) samples each."""
    real, fake = _pair(real, fake, 2)
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for i in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        scores[i] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2.0 * kxy.mean()
        )
    return float(scores.mean()), float(scores.std())


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x, k: int) -> np.ndarray:
    """Squared distance from each sample to its k-th nearest other sample (the radius of its k-NN ball)."""
    x = _as_features(x, "x")
    if not 0 < k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} samples, got {k}")
    radii = np.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        block = _sq_distances(x[start : start + _CHUNK], x)
        radii[start : start + _CHUNK] = np.partition(block, k, axis=1)[:, k]  # index 0 is the sample itself
    return radii


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """k-NN precision, recall (Kynkaenniemi et al. 2019) and coverage (Naeem et al. 2020); each set needs > k samples."""
    real, fake = _pair(real, fake, k + 1)
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_in_real = np.zeros(len(fake), dtype=bool)
    real_in_fake = np.zeros(len(real), dtype=bool)
    real_covered = np.zeros(len(real), dtype=bool)
    for start in range(0, len(fake), _CHUNK):
        block = _sq_distances(fake[start : start + _CHUNK], real)  # (fake chunk, real)
        fake_in_real[start : start + _CHUNK] = (block <= real_radii[None, :]).any(axis=1)
        real_in_fake |= (block <= fake_radii[start : start + _CHUNK, None]).any(axis=0)
        real_covered |= block.min(axis=0) <= real_radii
    return {
        "precision": float(fake_in_real.mean()),
        "recall": float(real_in_fake.mean()),
        "coverage": float(real_covered.mean()),
    }
