"""The random baseline: keyed by sample id, so shard- and order-invariant, and uniform."""

from __future__ import annotations

import numpy as np
from scipy import stats

from diffcurate.influence.random_baseline import (
    RandomConfig,
    random_attribution,
    random_risk,
    random_scores,
)

KEYS = [f"img-{i:05d}" for i in range(2000)]


def test_scores_are_shard_and_order_invariant():
    one_shot = random_scores(KEYS)
    shards = [KEYS[:700], KEYS[700:1500], KEYS[1500:]]
    np.testing.assert_array_equal(np.concatenate([random_scores(s) for s in shards]), one_shot)
    rev = list(reversed(KEYS))
    np.testing.assert_array_equal(random_scores(rev), one_shot[::-1])
    # Integer ids hash through str(), like the (t, ε) draws: 7 and "7" coincide.
    assert random_scores([7])[0] == random_scores(["7"])[0]


def test_scores_are_uniform_and_seeded():
    a = random_scores(KEYS, RandomConfig(seed=0))
    b = random_scores(KEYS, RandomConfig(seed=1))
    assert ((a >= 0) & (a < 1)).all()
    assert stats.kstest(a, "uniform").pvalue > 1e-3
    assert len(np.unique(a)) == len(a)
    assert abs(stats.spearmanr(a, b).statistic) < 0.1  # independent permutations per seed
    np.testing.assert_array_equal(random_scores(KEYS, RandomConfig(seed=0)), a)


def test_risk_result_follows_the_scorer_contract():
    res = random_risk(KEYS[:10], RandomConfig(seed=3))
    assert res.sample_keys == tuple(KEYS[:10])
    np.testing.assert_array_equal(res.score, random_scores(KEYS[:10], RandomConfig(seed=3)))
    assert np.isnan(res.stderr).all() and res.method == "random/keyed-uniform/seed3"


def test_attribution_is_keyed_per_pair():
    train, queries = KEYS[:30], ["q0", "q1", "q2"]
    full = random_attribution(train, queries)
    assert full.shape == (3, 30)
    np.testing.assert_array_equal(random_attribution(train[10:20], queries[1:]), full[1:, 10:20])
    assert not np.allclose(full[0], full[1])
