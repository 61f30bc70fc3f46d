"""Utility of a pruned model: Fréchet distance and KID between feature sets.

Pruning is only worth it if the model still generates images like the held-out real ones. The
gate compares generations of the baseline and the candidate model with held-out real images on
image features:

- Fréchet distance (FD; "FID" when the features are Inception-v3 pool features): fit a Gaussian
  to each feature set and take ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. It is biased
  for small sets, which is why the gate compares before/after *on the same set sizes*.
- Kernel Inception Distance (KID, Binkowski et al. 2018): the unbiased estimate of the squared
  MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random
  equal-size subsets (mean and standard deviation reported). Unbiased, so usable on the small
  sets a CPU-only gate can afford; it can be slightly negative when the sets match.

Features: Inception or CLIP weights cannot be downloaded here, so :func:`pixel_features`
provides a tiny deterministic extractor: images downsampled to ``size x size`` pixels, then a
fixed seeded Gaussian random projection (a Johnson-Lindenstrauss sketch) to ``dim`` numbers. It
measures shifts in the *pixel* distribution (blur, contrast, mode dropping, new artefacts), not
perceptual quality, and its FD is **not** FID: numbers are comparable only between runs with
the same extractor configuration, which the gate guarantees by computing before and after
together. Use CLIP image embeddings from a local checkpoint where one is configured.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field
from scipy import linalg


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (``ddof=1``) covariance of ``[n, d]`` features, in float64."""
    x = _features(features, "features")
    if x.shape[0] < 2:
        raise ValueError("need at least two feature rows for a covariance")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    The matrix square root of ``sigma1 @ sigma2`` follows the reference FID code
    (pytorch-fid, TTUR): if ``scipy.linalg.sqrtm`` returns non-finite values (near-singular
    covariances, e.g. fewer samples than dimensions) both covariances get ``eps * I`` added and
    the root is recomputed; a complex result whose diagonal has imaginary parts above 1e-3 is an
    error (a real problem with the inputs), smaller imaginary parts are round-off and dropped.
    Round-off can also push a distance of zero slightly negative; it is clipped at 0.

    Raises:
        ValueError: Mismatched shapes, or a significantly complex square root.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {m1.shape}/{m2.shape}, sigma {s1.shape}/{s2.shape}")
    diff = m1 - m2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > 1e-3:
            raise ValueError(f"covariance square root has imaginary component {worst:.3g}")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def frechet_distance(x: ArrayLike, y: ArrayLike, *, eps: float = 1e-6) -> float:
    """Fréchet distance between two feature matrices ``[n, d]`` and ``[m, d]``."""
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)


class KIDResult(BaseModel):
    """KID over random subsets.

    Attributes:
        mean: Mean of the per-subset unbiased MMD² estimates.
        std: Their sample standard deviation (``ddof=1``; 0 for a single subset).
        subsets: Number of subsets.
        subset_size: Rows drawn (without replacement) from each set per subset.
    """

    model_config = ConfigDict(frozen=True)

    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``(x.y / d + 1)^3`` for all row pairs."""
    base = x @ y.T / x.shape[1] + 1.0
    return base * base * base  # two multiplies: several times faster than ``** 3`` (pow)


def mmd2_unbiased(x: ArrayLike, y: ArrayLike) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (diagonal terms of Kxx, Kyy excluded).

    ``sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
    - 2 sum_{i,j} k(x_i, y_j) / (mn)``.
    """
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    m, n = a.shape[0], b.shape[0]
    if m < 2 or n < 2:
        raise ValueError("need at least two rows in each set")
    kxx, kyy, kxy = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    x: ArrayLike,
    y: ArrayLike,
    *,
    subsets: int = 100,
    subset_size: int | None = 1000,
    seed: int = 0,
) -> KIDResult:
    """KID between feature sets: unbiased MMD² averaged over random subsets.

    As in torchmetrics/torch-fidelity, each subset draws ``subset_size`` rows without
    replacement from each set independently.

    Args:
        x: Features ``[n, d]``.
        y: Features ``[m, d]``.
        subsets: Number of random subsets.
        subset_size: Rows per subset; capped at ``min(n, m)`` (small gate sets), None = that cap.
        seed: Seed of the subset draws, so that a gate run is reproducible.

    Returns:
        Mean and standard deviation over subsets.
    """
    a, b = _features(x, "x"), _features(y, "y")
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    cap = min(a.shape[0], b.shape[0])
    size = cap if subset_size is None else min(subset_size, cap)
    if size < 2:
        raise ValueError("KID needs at least two rows in each set")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                a[rng.choice(a.shape[0], size, replace=False)],
                b[rng.choice(b.shape[0], size, replace=False)],
            )
            for _ in range(subsets)
        ]
    )
    std = float(values.std(ddof=1)) if subsets > 1 else 0.0
    return KIDResult(mean=float(values.mean()), std=std, subsets=subsets, subset_size=size)


class PixelFeatureConfig(BaseModel):
    """The deterministic stand-in feature extractor (see the module docstring).

    Attributes:
        size: Images are resized (anti-aliased, bilinear) to ``size x size``.
        dim: Output dimension of the random projection; None keeps the raw resized pixels.
        grayscale: Average colour channels first, so grey and RGB images are comparable.
        seed: Seed of the projection matrix; part of the feature definition.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(16, ge=2, le=256)
    dim: int | None = Field(64, ge=1)
    grayscale: bool = True
    seed: int = 0


def pixel_features(images: ArrayLike, config: PixelFeatureConfig | None = None) -> np.ndarray:
    """Deterministic features ``[n, dim]`` of images ``[n, H, W(, C)]`` (uint8 or [0, 1]).

    Pixels are mapped to [-1, 1], resized, flattened and multiplied by a fixed Gaussian matrix
    with entries ``N(0, 1/dim)``, which preserves distances between images up to the
    Johnson-Lindenstrauss distortion. Identical inputs and configuration give identical
    features on every machine.
    """
    from skimage.transform import resize

    from diffcurate.metrics.memorization import as_unit_images

    config = config or PixelFeatureConfig()
    imgs = as_unit_images(images)
    if config.grayscale:
        imgs = imgs.mean(axis=3, keepdims=True)
    n, channels = imgs.shape[0], imgs.shape[3]
    shape = (config.size, config.size, channels)
    small = np.stack(
        [resize(im, shape, order=1, anti_aliasing=True, preserve_range=True) for im in imgs]
    )
    flat = (small.reshape(n, -1) * 2.0) - 1.0
    if config.dim is None:
        return flat
    rng = np.random.default_rng(config.seed)
    proj = rng.standard_normal((flat.shape[1], config.dim)) / np.sqrt(config.dim)
    return flat @ proj


def _features(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x
