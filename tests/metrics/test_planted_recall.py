"""Tie-aware recall@k and mid-ranks, checked against brute force over every tie-breaking order."""

import itertools

import numpy as np
import pytest

from diffcurate.metrics.planted_recall import (
    expected_recall_at_k,
    mid_ranks,
    planted_recall_and_rank,
    top_k_for_fraction,
)


def brute_force_expected_recall(scores, ids, planted, k):
    """Average recall@k over every permutation of the samples, sorted stably by score."""
    total, count = 0.0, 0
    for perm in itertools.permutations(range(len(ids))):
        order = sorted(perm, key=lambda j: -scores[j])  # stable: perm order breaks ties
        top = {ids[j] for j in order[:k]}
        total += len(top & planted) / len(planted)
        count += 1
    return total / count


def test_no_ties_equals_plain_argsort():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    ids = [f"s{i}" for i in range(200)]
    planted = {"s3", "s50", "s199", "s120"}
    order = np.argsort(-scores)
    top = {ids[j] for j in order[:2]}
    recall, med = planted_recall_and_rank(scores, ids, planted, fraction=0.01)
    assert recall == len(top & planted) / 4
    ranks = {ids[j]: r + 1 for r, j in enumerate(order)}
    assert med == np.median([ranks[p] for p in planted])


def test_tie_at_the_boundary_gets_fractional_credit_not_position_order():
    # 1 clear winner, then a 4-way tie for the remaining 2 slots; the planted id sits LAST,
    # where a stable argsort would always leave it out of the window.
    scores = [9.0, 5.0, 5.0, 5.0, 5.0, 1.0]
    ids = ["a", "b", "c", "d", "p", "e"]
    got = expected_recall_at_k(scores, ids, {"p"}, k=3)
    assert got == pytest.approx(2 / 4)
    assert got == pytest.approx(brute_force_expected_recall(scores, ids, {"p"}, 3))


@pytest.mark.parametrize("seed", range(6))
def test_expected_recall_equals_average_over_all_tie_breaks(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=7).astype(float).tolist()  # many ties
    ids = [f"i{j}" for j in range(7)]
    planted = {ids[j] for j in rng.choice(7, size=3, replace=False)}
    for k in (1, 3, 5):
        assert expected_recall_at_k(scores, ids, planted, k) == pytest.approx(
            brute_force_expected_recall(scores, ids, planted, k)
        )


def test_mid_ranks_share_the_mean_position():
    assert mid_ranks([3.0, 7.0, 3.0, 1.0]).tolist() == [2.5, 1.0, 2.5, 4.0]


def test_all_tied_scores_look_like_random_ranking():
    ids = [f"i{j}" for j in range(100)]
    recall, med = planted_recall_and_rank(np.zeros(100), ids, {"i98", "i99"}, fraction=0.05)
    assert recall == pytest.approx(0.05)  # 5 slots shared by 100 tied samples
    assert med == 50.5


def test_window_size_is_ceil_of_the_fraction():
    assert top_k_for_fraction(810, 0.01) == 9
    assert top_k_for_fraction(700, 0.01) == 7  # 0.01 * 700 = 7.000000000000001 in floats
    assert top_k_for_fraction(5, 0.01) == 1


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        planted_recall_and_rank([1.0, float("nan")], ["a", "b"], {"a"})
    with pytest.raises(ValueError, match="not scored"):
        planted_recall_and_rank([1.0, 2.0], ["a", "b"], {"z"})
    with pytest.raises(ValueError, match="2 scores for 3 ids"):
        planted_recall_and_rank([1.0, 2.0], ["a", "b", "c"], {"a"})
