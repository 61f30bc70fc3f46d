"""Candidate removal set: top-rho%, threshold, deterministic ties, fairness cap."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from diffcurate.curation.flag import FlagPolicy, select_removals


def ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def test_top_one_percent_rounds_up_and_orders_by_score():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=250)
    result = select_removals(ids(250), scores)
    top3 = [f"s{i:04d}" for i in np.argsort(-scores)[:3]]
    assert result.target_count == 3  # ceil(2.5)
    assert result.flagged_ids == top3
    assert result.min_flagged_score == pytest.approx(np.sort(scores)[-3])
    assert result.skipped == [] and result.group_caps == {} and result.notes == []


def test_fraction_count_is_robust_to_float_round_off():
    # 0.07 * 100 = 7.000000000000001 in floating point: must flag 7, not 8.
    result = select_removals(ids(100), np.arange(100.0), policy=FlagPolicy(fraction=0.07))
    assert result.target_count == 7 and len(result.flagged_ids) == 7
    assert result.flagged_ids == [f"s{i:04d}" for i in range(99, 92, -1)]


def test_ties_are_broken_by_sample_id_whatever_the_input_order():
    names = ["d", "b", "e", "a", "c"]
    scores = [1.0, 1.0, 1.0, 0.5, 1.0]
    policy = FlagPolicy(fraction=0.4)
    result = select_removals(names, scores, policy=policy)
    assert result.flagged_ids == ["b", "c"]
    shuffled = select_removals(names[::-1], scores[::-1], policy=policy)
    assert shuffled.flagged_ids == ["b", "c"]


def test_threshold_mode_is_inclusive():
    result = select_removals(
        ["a", "b", "c", "d"],
        [0.2, 0.9, 0.5, 0.49],
        policy=FlagPolicy(mode="threshold", threshold=0.5),
    )
    assert result.flagged_ids == ["b", "c"]
    assert result.target_count == 2 and result.corpus_rate == 0.5


def test_fairness_cap_skips_the_capped_group_and_refills():
    # 100 'a' samples all score above 100 'b' samples; top 10% = 20.
    # cap 1.5 x 10% -> at most floor(0.15 * 100) = 15 per group.
    names = ids(100, "a") + ids(100, "b")
    scores = np.concatenate([np.linspace(2, 1.01, 100), np.linspace(1, 0, 100)])
    groups = ["a"] * 100 + ["b"] * 100
    policy = FlagPolicy(fraction=0.1, fairness_cap=1.5)
    result = select_removals(names, scores, policy=policy, groups=groups)

    assert result.group_caps == {"a": 15, "b": 15}
    assert result.flagged_ids == ids(15, "a") + ids(5, "b")
    assert result.flagged_by_group == {"a": 15, "b": 5}
    # Every 'a' sample ranked above the fifth 'b' was passed over, with the reason.
    assert [s.sample_id for s in result.skipped] == [f"a{i:04d}" for i in range(15, 100)]
    assert all(s.group == "a" and "cap of 15" in s.reason for s in result.skipped)
    assert result.skipped[0].score == pytest.approx(scores[15])
    # The invariant the cap promises, on the result itself.
    overall = len(result.flagged_ids) / 200
    for g, k in result.flagged_by_group.items():
        assert k / 100 <= 1.5 * overall + 1e-12, g

    unconstrained = select_removals(names, scores, policy=FlagPolicy(fraction=0.1), groups=groups)
    assert unconstrained.flagged_by_group == {"a": 20, "b": 0}


def test_fairness_cap_without_refill_reports_the_shortfall():
    names = ids(100, "a") + ids(100, "b")
    scores = np.concatenate([np.linspace(2, 1.01, 100), np.linspace(1, 0, 100)])
    groups = ["a"] * 100 + ["b"] * 100
    policy = FlagPolicy(fraction=0.1, fairness_cap=1.5, refill=False)
    result = select_removals(names, scores, policy=policy, groups=groups)
    assert result.flagged_ids == ids(15, "a")
    assert [s.sample_id for s in result.skipped] == [f"a{i:04d}" for i in range(15, 20)]
    assert result.notes and "5 short of 20" in result.notes[0]


def test_threshold_mode_with_cap_never_goes_below_the_threshold():
    names = ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]
    scores = [0.9, 0.8, 0.7, 0.1, 0.6, 0.1, 0.1, 0.1]
    groups = ["a"] * 4 + ["b"] * 4
    policy = FlagPolicy(mode="threshold", threshold=0.5, fairness_cap=1.0)
    result = select_removals(names, scores, policy=policy, groups=groups)
    # 4 of 8 pass the threshold (rate 0.5): each group may lose floor(0.5 * 4) = 2.
    assert result.group_caps == {"a": 2, "b": 2}
    assert result.flagged_ids == ["a1", "a2", "b1"]
    assert [s.sample_id for s in result.skipped] == ["a3"]
    assert "1 short of 4" in result.notes[0]


def test_missing_groups_are_capped_as_unknown():
    names = ids(20)
    scores = np.arange(20.0)[::-1]
    groups = [None] * 10 + ["x"] * 10
    policy = FlagPolicy(fraction=0.2, fairness_cap=1.0)  # 4 flagged, 2 per group
    result = select_removals(names, scores, policy=policy, groups=groups)
    assert result.group_caps == {"unknown": 2, "x": 2}
    assert result.flagged_ids == ["s0000", "s0001", "s0010", "s0011"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        select_removals(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="duplicate"):
        select_removals(["a", "a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="scores for"):
        select_removals(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="group label"):
        select_removals(["a", "b"], [1.0, 2.0], policy=FlagPolicy(fairness_cap=2.0))
    with pytest.raises(ValidationError, match="needs a threshold"):
        FlagPolicy(mode="threshold")
    with pytest.raises(ValidationError):
        FlagPolicy(fraction=0.0)
    with pytest.raises(ValidationError):
        FlagPolicy(fairness_cap=0.5)
    with pytest.raises(ValidationError):
        FlagPolicy().fraction = 0.5  # frozen
