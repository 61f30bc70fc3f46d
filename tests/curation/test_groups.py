"""Duplicate-group collapsing for the flag step."""

import numpy as np
import pytest

from diffcurate.curation.flag import FlagPolicy, select_removals
from diffcurate.curation.groups import collapse_groups


def test_groups_collapse_to_their_riskiest_copy_and_expand_back():
    ids = ["a1", "a2", "a3", "b", "c1", "c2", "d"]
    scores = [0.5, 0.9, 0.7, 0.8, 0.1, 0.2, 0.3]
    group_of = {"a1": "A", "a2": "A", "a3": "A", "c1": "C", "c2": "C"}
    col = collapse_groups(ids, scores, group_of)
    assert col.representatives == ["a2", "b", "c2", "d"]
    np.testing.assert_array_equal(col.scores, [0.9, 0.8, 0.2, 0.3])
    assert col.members["a2"] == ["a1", "a2", "a3"] and col.members["d"] == ["d"]
    assert col.expand(["a2", "d"]) == ["a1", "a2", "a3", "d"]


def test_copies_do_not_eat_the_flag_budget():
    # Ten copies of one image score highest; per-sample top-2 would take two copies of it.
    ids = [f"x{i}" for i in range(10)] + ["y", "z", "w"]
    scores = [1.0 - 0.001 * i for i in range(10)] + [0.95, 0.5, 0.1]
    col = collapse_groups(ids, scores, {f"x{i}": "X" for i in range(10)})
    flagged = select_removals(col.representatives, col.scores, policy=FlagPolicy(fraction=0.5))
    assert flagged.flagged_ids == ["x0", "y"]
    assert sorted(col.expand(flagged.flagged_ids)) == sorted([*ids[:10], "y"])


def test_ties_pick_the_smallest_id_and_bad_input_is_refused():
    col = collapse_groups(["b", "a"], [1.0, 1.0], {"a": "G", "b": "G"})
    assert col.representatives == ["a"]
    with pytest.raises(ValueError, match="2 scores for 1"):
        collapse_groups(["a"], [1.0, 2.0], {})
    with pytest.raises(ValueError, match="duplicate"):
        collapse_groups(["a", "a"], [1.0, 2.0], {})
