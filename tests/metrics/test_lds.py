"""LDS (seed 001 eq. 13): exact values on linear datamodels, noise, sign flips and a hand case."""

import numpy as np
import pytest

from diffcurate.metrics.lds import (
    group_attributions,
    lds_from_losses,
    linear_datamodeling_score,
    random_subsets,
)


def _case(n_query=6, n_train=40, n_subsets=30, seed=0):
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(n_query, n_train))
    masks = random_subsets(n_train, n_subsets, seed=seed)
    return tau, masks


def test_exactly_linear_datamodel_scores_one_even_after_a_monotone_transform():
    tau, masks = _case()
    f = masks @ tau.T  # the datamodel is exact
    assert linear_datamodeling_score(tau, masks, f).mean == pytest.approx(1.0)
    # Spearman sees only ranks: a strictly increasing transform of each query's outputs
    # (different per query, with an offset and a scale) changes nothing.
    warped = np.exp(0.3 * f) * np.arange(1, f.shape[1] + 1) + 5.0
    res = linear_datamodeling_score(tau, masks, warped)
    np.testing.assert_allclose(res.per_query, 1.0)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)


def test_scale_of_the_scores_does_not_matter():
    tau, masks = _case()
    f = masks @ tau.T + np.random.default_rng(1).normal(scale=0.5, size=(30, 6))
    a = linear_datamodeling_score(tau, masks, f)
    b = linear_datamodeling_score(tau * 1e-6, masks, f)  # e.g. kronfluence's missing 1/N
    np.testing.assert_allclose(a.per_query, b.per_query)
    assert 0.5 < a.mean < 1.0


def test_negated_outputs_score_minus_one():
    tau, masks = _case()
    assert linear_datamodeling_score(tau, masks, -(masks @ tau.T)).mean == pytest.approx(-1.0)


def test_sign_convention_for_losses():
    """τ HIGH = training on i lowers q's loss: a loss that falls by τ when i is trained on is a
    perfect datamodel (LDS +1) once the loss is negated, -1 if it is not."""
    tau, masks = _case()
    losses = 2.0 - 0.01 * (masks @ tau.T)  # each helpful sample lowers the loss
    assert lds_from_losses(tau, masks, losses).mean == pytest.approx(1.0)
    assert linear_datamodeling_score(tau, masks, losses).mean == pytest.approx(-1.0)


def test_independent_outputs_score_about_zero():
    tau, masks = _case(n_query=50, n_train=100, n_subsets=200, seed=3)
    f = np.random.default_rng(4).normal(size=(200, 50))
    res = linear_datamodeling_score(tau, masks, f)
    # Each per-query Spearman over 200 subsets has sd ~ 1/sqrt(199) = 0.07; the mean of 50 has
    # sd ~ 0.01, so |mean| < 0.05 is a 5-sigma bound for this fixed seed.
    assert abs(res.mean) < 0.05
    assert np.abs(res.per_query).max() < 0.35
    assert res.stderr == pytest.approx(res.per_query.std(ddof=1) / np.sqrt(50))


def test_hand_computed_spearman():
    tau = np.array([[1.0, 2.0, 3.0, 4.0]])
    masks = np.array(
        [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=bool
    )  # g = 3, 4, 6, 7
    np.testing.assert_allclose(group_attributions(tau, masks)[:, 0], [3, 4, 6, 7])
    f = np.array([[0.1], [0.3], [0.2], [0.4]])  # ranks 1, 3, 2, 4 against 1, 2, 3, 4
    # rho = 1 - 6 Σd² / (n (n² - 1)) = 1 - 6·2 / (4·15) = 0.8
    res = linear_datamodeling_score(tau, masks, f)
    assert res.per_query[0] == pytest.approx(0.8)
    assert res.mean == pytest.approx(0.8)
    assert np.isnan(res.stderr)  # one query: no standard error


def test_constant_side_scores_zero_not_nan():
    tau, masks = _case(n_query=2)
    tau[1] = 0.0  # a method that predicts nothing for query 1
    res = linear_datamodeling_score(tau, masks, masks @ np.abs(tau).T + 1.0)
    assert res.per_query[1] == 0.0 and np.isfinite(res.mean)


def test_random_subsets_are_seeded_sized_and_prefix_stable():
    masks = random_subsets(101, 20, alpha=0.5, seed=7)
    assert masks.shape == (20, 101)
    assert masks.dtype == bool
    assert (masks.sum(axis=1) == 50).all()  # round(0.5 · 101) = 50, without replacement
    np.testing.assert_array_equal(masks, random_subsets(101, 20, alpha=0.5, seed=7))
    assert not np.array_equal(masks, random_subsets(101, 20, alpha=0.5, seed=8))
    # Subset m depends on (seed, m) only: more subsets keep the first ones.
    np.testing.assert_array_equal(random_subsets(101, 40, seed=7)[:20], masks)
    assert len({row.tobytes() for row in masks}) == 20
    assert (random_subsets(10, 3, alpha=0.3, seed=0).sum(axis=1) == 3).all()
    # Every training sample is in about half the subsets.
    many = random_subsets(50, 400, seed=1).mean(axis=0)
    assert np.abs(many - 0.5).max() < 0.1


@pytest.mark.parametrize(
    ("args", "match"),
    [((10, 5, 0.0), "alpha"), ((10, 5, 1.5), "alpha"), ((0, 5, 0.5), "n_train")],
)
def test_random_subsets_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        random_subsets(*args)


def test_shape_and_value_checks():
    tau, masks = _case()
    with pytest.raises(ValueError, match="f must be"):
        linear_datamodeling_score(tau, masks, np.zeros((30, 5)))
    with pytest.raises(ValueError, match="tau"):
        linear_datamodeling_score(tau[:, :10], masks, np.zeros((30, 6)))
    with pytest.raises(ValueError, match="3 subsets"):
        linear_datamodeling_score(tau, masks[:2], np.zeros((2, 6)))
    bad = masks @ tau.T
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        linear_datamodeling_score(tau, masks, bad)
