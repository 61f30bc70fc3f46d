"""Fréchet distance and KID against closed forms and dense direct computations.

torchmetrics is not installed in this environment, so there is no cross-check against its
functional implementations; the references here are independent formulas instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffcurate.metrics.utility import (
    PixelFeatureConfig,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    mmd2_unbiased,
    pixel_features,
)


def spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root by eigendecomposition (independent of scipy's sqrtm)."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the symmetric form."""
    r = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r @ s2 @ r)))


def test_fd_of_diagonal_gaussians_by_hand():
    # |(1, 2)|^2 + (sqrt(1) - sqrt(4))^2 + (sqrt(4) - sqrt(9))^2 = 5 + 1 + 1
    fd = frechet_distance_from_stats([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0]))
    assert fd == pytest.approx(7.0, rel=1e-12)


def test_fd_of_general_gaussians_matches_symmetric_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = spd(rng, d), spd(rng, d)
        got = frechet_distance_from_stats(mu1, s1, mu2, s2)
        assert got == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=1e-9)
        assert got == pytest.approx(frechet_distance_from_stats(mu2, s2, mu1, s1), rel=1e-9)


def test_fd_from_samples_uses_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 6)), rng.normal(0.3, 1.5, size=(200, 6))
    want = closed_form_fd(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(want, rel=1e-9)
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, ddof=1))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_large_samples_approaches_population_value():
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2, s1, s2 = np.zeros(d), np.full(d, 0.5), spd(rng, d), spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=20_000)
    y = rng.multivariate_normal(mu2, s2, size=20_000)
    assert frechet_distance(x, y) == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=0.05)


def test_fd_is_invariant_to_a_shared_rotation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(100, 5)), rng.normal(1, 2, size=(80, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert frechet_distance(x @ q, y @ q) == pytest.approx(frechet_distance(x, y), rel=1e-8)


def test_fd_survives_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))  # fewer samples than dims
    fd = frechet_distance(x, y)
    assert np.isfinite(fd) and fd > 0


def dense_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, as explicit double sums."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_matches_dense_double_sum():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.4, 1.0, size=(9, 5))
    assert mmd2_unbiased(x, y) == pytest.approx(dense_mmd2(x, y), rel=1e-12)


def test_kid_with_one_full_subset_is_the_full_set_mmd2():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1.0, size=(30, 4))
    kid = kernel_inception_distance(x, y, subsets=1, subset_size=30)
    assert kid.mean == pytest.approx(dense_mmd2(x, y), rel=1e-10)
    assert (kid.std, kid.subsets, kid.subset_size) == (0.0, 1, 30)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    shifted = rng.normal(0.5, 1.0, size=(400, 16))
    same = kernel_inception_distance(x, y, subsets=20, subset_size=200, seed=0)
    identical = kernel_inception_distance(x, x, subsets=20, subset_size=200, seed=0)
    diff = kernel_inception_distance(x, shifted, subsets=20, subset_size=200, seed=0)
    assert diff.mean > 10 * diff.std > 0
    assert abs(same.mean) < 0.05 * diff.mean
    assert abs(identical.mean) < 0.05 * diff.mean
    again = kernel_inception_distance(x, shifted, subsets=20, subset_size=200, seed=0)
    assert again == diff  # seeded subsets: reproducible
    capped = kernel_inception_distance(x[:50], y, subsets=2, subset_size=1000)
    assert capped.subset_size == 50


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([[0.0, np.nan], [1.0, 2.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError):
        kernel_inception_distance(np.ones((1, 2)), np.ones((5, 2)))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().images / 16.0


def test_pixel_features_are_deterministic_and_sized(digits):
    cfg = PixelFeatureConfig(size=8, dim=32, seed=3)
    a, b = pixel_features(digits[:50], cfg), pixel_features(digits[:50], cfg)
    assert a.shape == (50, 32)
    np.testing.assert_array_equal(a, b)
    rgb = np.repeat(digits[:50, :, :, None], 3, axis=3)
    np.testing.assert_allclose(pixel_features(rgb, cfg), a, atol=1e-12)
    u8 = (digits[:50] * 255).round().astype(np.uint8)
    np.testing.assert_allclose(pixel_features(u8, cfg), a, atol=0.05)
    raw = pixel_features(digits[:5], PixelFeatureConfig(size=8, dim=None))
    np.testing.assert_allclose(raw, digits[:5].reshape(5, -1) * 2 - 1, atol=1e-12)
    assert not np.allclose(pixel_features(digits[:5], cfg.model_copy(update={"seed": 4})), a[:5])


def test_pixel_fd_ranks_real_digits_closer_than_degraded_ones(digits):
    rng = np.random.default_rng(0)
    ref, real = digits[:600], digits[600:1200]
    noise = rng.random((600, 8, 8))
    faded = real * 0.5
    f = pixel_features
    fd_real = frechet_distance(f(ref), f(real))
    fd_faded = frechet_distance(f(ref), f(faded))
    fd_noise = frechet_distance(f(ref), f(noise))
    assert fd_real < 0.2 * fd_faded < fd_noise
