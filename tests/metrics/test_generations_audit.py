"""Generations audit: a group erased from a model's outputs is detected, with hand-computed
statistics; balanced or mild changes pass."""

from __future__ import annotations

import pytest
from scipy import stats

from diffcurate.metrics.generations_audit import GenerationsAuditPolicy, audit_generations
from diffcurate.metrics.inferred_attributes import UNCERTAIN


def test_erased_group_is_a_violation_hand_computed():
    before = {"gender": ["man"] * 100 + ["woman"] * 100}
    after = {"gender": ["man"] * 200}
    res = audit_generations(before, after)
    (a,) = res.attributes
    shares = {g.group: g for g in a.groups}
    assert shares["woman"].share_before == 0.5 and shares["woman"].share_after == 0.0
    assert shares["woman"].share_ratio == 0.0 and shares["man"].share_ratio == 2.0
    # table rows man [100, 200], woman [100, 0]; E = 150, 150, 50, 50:
    # chi2 = 2 * 50^2/150 + 2 * 50^2/50 = 133.33
    assert a.test == "chi2" and a.chi2 == pytest.approx(2 * 2500 / 150 + 2 * 2500 / 50)
    assert a.p_value == pytest.approx(stats.chi2.sf(400 / 3, 1))
    assert a.cramers_v == pytest.approx((400 / 3 / 400) ** 0.5)
    assert a.lowest_group == "woman" and a.violation and not res.passed
    assert res.lowest_share_ratio == 0.0
    assert "'woman' falls from 50.0%" in res.violations[0]


def test_same_shares_pass_and_mild_drift_passes():
    before = {"gender": ["man"] * 100 + ["woman"] * 100}
    same = audit_generations(before, {"gender": ["woman"] * 100 + ["man"] * 100})
    assert same.passed and same.attributes[0].p_value == pytest.approx(1.0)
    # woman 100 -> 80 of 200: ratio 0.8 >= 0.5, no violation even if the test were significant.
    drift = audit_generations(before, {"gender": ["man"] * 120 + ["woman"] * 80})
    assert drift.passed and drift.lowest_share_ratio == pytest.approx(0.8)


def test_holm_across_attributes_and_unjudged_groups():
    before = {
        "gender": ["man"] * 100 + ["woman"] * 100,
        "faces": ["0"] * 195 + ["1"] * 5,
    }  # '1' has 5 < 10 generations: not judged
    after = {"gender": ["man"] * 200, "faces": ["0"] * 200}
    res = audit_generations(before, after)
    gender, faces = res.attributes
    assert faces.lowest_group == "0" and not faces.violation
    assert {g.group: g.judged for g in faces.groups} == {"0": True, "1": False}
    # Two tests: Holm multiplies the smaller p by 2.
    assert gender.p_value_holm == pytest.approx(min(1.0, 2 * gender.p_value))
    assert res.violations and len(res.violations) == 1


def test_uncertain_is_never_judged_erased():
    before = {"g": ["a"] * 50 + ["b"] * 50 + [UNCERTAIN] * 100}
    after = {"g": ["a"] * 100 + ["b"] * 100}
    res = audit_generations(before, after)
    assert res.passed and res.attributes[0].lowest_group in {"a", "b"}


def test_policy_threshold_and_input_checks():
    before = {"g": ["a"] * 100 + ["b"] * 100}
    after = {"g": ["a"] * 140 + ["b"] * 60}  # b ratio 0.6
    assert audit_generations(before, after).passed
    strict = GenerationsAuditPolicy(min_share_ratio=0.7)
    assert not audit_generations(before, after, strict).passed
    with pytest.raises(ValueError, match="attributes differ"):
        audit_generations(before, {"h": ["a"]})
    with pytest.raises(ValueError, match="no attributes"):
        audit_generations({}, {})
