"""Fairness audit: statistics against hand computations and scipy, skew detected, balance passes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffcurate.metrics.audit import (
    UNKNOWN_GROUP,
    AuditPolicy,
    audit_arrays,
    audit_removals,
    cramers_v,
    group_labels,
    holm_adjust,
)


def build(groups: dict[str, tuple[int, int]], extra: dict | None = None) -> pd.DataFrame:
    """One row per sample: ``groups[g] = (n, n_removed)``; removed rows come first per group."""
    rows = []
    for g, (n, k) in groups.items():
        rows += [{"skin": g, "removed": i < k} for i in range(n)]
    frame = pd.DataFrame(rows)
    for name, fn in (extra or {}).items():
        frame[name] = [fn(i, r) for i, r in enumerate(frame.itertuples())]
    return frame


def pearson_chi2(table: np.ndarray) -> float:
    """Pearson's statistic written out: sum (O - E)^2 / E with E = row * col / n."""
    n = table.sum()
    expected = np.outer(table.sum(1), table.sum(0)) / n
    return float(((table - expected) ** 2 / expected).sum())


def test_holm_matches_hand_computed_example():
    # sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04
    # running max -> 0.02, 0.03, 0.06, 0.06; back in input order:
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(holm_adjust([0.2]), [0.2])
    assert holm_adjust([]).size == 0
    with pytest.raises(ValueError):
        holm_adjust([0.1, float("nan")])


def test_holm_matches_statsmodels_when_installed():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).uniform(0, 0.2, size=9)
    expected = multitest.multipletests(p, method="holm")[1]
    np.testing.assert_allclose(holm_adjust(p), expected, rtol=1e-12)


def test_skewed_removal_set_is_detected():
    # 'a' loses 25% of its samples, 'b' and 'c' 2%: retention 0.75 vs 0.98 -> ratio 0.765.
    # 'region' alternates within every group and within the removed rows: exactly independent.
    frame = build(
        {"a": (200, 50), "b": (200, 4), "c": (100, 2)},
        extra={"region": lambda i, r: "north" if i % 2 else "south"},
    )
    result = audit_removals(frame, ["skin", "region"])

    skin = result.attributes[0]
    rates = {g.group: (g.n, g.n_removed, g.removal_rate) for g in skin.groups}
    assert rates == {"a": (200, 50, 0.25), "b": (200, 4, 0.02), "c": (100, 2, 0.02)}
    assert skin.retention_ratio == pytest.approx(0.75 / 0.98)
    assert (skin.lowest_group, skin.highest_group) == ("a", "b")
    assert skin.ratio_violation

    table = np.array([[150, 50], [196, 4], [98, 2]])
    chi2 = pearson_chi2(table)
    assert skin.test == "chi2" and skin.dof == 2
    assert skin.chi2 == pytest.approx(chi2, rel=1e-12)
    assert skin.p_value == pytest.approx(stats.chi2.sf(chi2, 2), rel=1e-9)
    assert skin.cramers_v == pytest.approx(math.sqrt(chi2 / 500), rel=1e-12)

    region = result.attributes[1]
    assert region.chi2 == pytest.approx(0.0, abs=1e-12)
    assert region.p_value == pytest.approx(1.0)
    assert not region.ratio_violation and not region.dependence_violation

    # Holm over two attributes: the smaller p doubles, the larger is max(2 p_min, p_max).
    assert skin.p_value_holm == pytest.approx(2 * skin.p_value, rel=1e-12)
    assert skin.p_value_holm < 0.05 and skin.dependence_violation
    assert region.p_value_holm == pytest.approx(1.0)

    assert not result.passed
    assert len(result.violations) == 2
    assert all(v.startswith("skin:") for v in result.violations)
    assert "four-fifths" in result.violations[0] and "'a' keeps 75.0%" in result.violations[0]
    assert (result.n_samples, result.n_removed) == (500, 56)


def test_unskewed_removal_set_passes():
    result = audit_removals(build({"a": (200, 4), "b": (200, 4), "c": (100, 2)}), ["skin"])
    skin = result.attributes[0]
    assert skin.retention_ratio == pytest.approx(1.0)
    assert skin.chi2 == pytest.approx(0.0, abs=1e-12) and skin.p_value == pytest.approx(1.0)
    assert result.passed and result.violations == []


def test_fisher_exact_for_sparse_two_by_two():
    # g1: 7 kept, 5 removed; g2: 12 kept, 0 removed. Expected removed counts 2.5 < 5 -> Fisher.
    frame = build({"g1": (12, 5), "g2": (12, 0)})
    skin = audit_removals(frame, ["skin"]).attributes[0]
    assert skin.test == "fisher"
    # Hypergeometric by hand: P(k removed in g1) = C(12,k) C(12,5-k) / C(24,5); the observed
    # table (k=5) and its mirror (k=0) are the only ones as extreme: p = 2 * C(12,5) / C(24,5).
    p_hand = 2 * math.comb(12, 5) / math.comb(24, 5)
    assert skin.p_value == pytest.approx(p_hand, rel=1e-9)
    assert skin.p_value == pytest.approx(stats.fisher_exact([[7, 5], [12, 0]]).pvalue, rel=1e-12)
    chi2 = pearson_chi2(np.array([[7, 5], [12, 0]]))
    assert skin.chi2 == pytest.approx(chi2)
    assert skin.cramers_v == pytest.approx(math.sqrt(chi2 / 24))  # phi for a 2x2


def test_chi_square_equals_scipy_on_larger_table():
    rng = np.random.default_rng(0)
    groups = rng.choice(["x", "y", "z", "w"], size=3000)
    removed = rng.random(3000) < np.where(groups == "x", 0.06, 0.03)
    attr = audit_arrays(removed, {"g": groups}).attributes[0]
    table = pd.crosstab(groups, removed).sort_index().to_numpy()
    ref = stats.chi2_contingency(table, correction=False)
    assert attr.chi2 == pytest.approx(ref.statistic, rel=1e-12)
    assert attr.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert attr.cramers_v == pytest.approx(cramers_v(ref.statistic, 3000, (4, 2)))
    assert attr.cramers_v == pytest.approx(math.sqrt(ref.statistic / 3000))


def test_weighted_cells_give_fairlearns_per_row_selection_rates():
    # The audit feeds MetricFrame count-weighted (group, removed) cells for speed; the rates
    # must equal MetricFrame on one row per sample.
    from fairlearn.metrics import MetricFrame, selection_rate

    rng = np.random.default_rng(1)
    groups = rng.choice(["p", "q", "r", None], size=1500)
    removed = rng.random(1500) < 0.1
    attr = audit_arrays(removed, {"g": groups}).attributes[0]
    per_row = MetricFrame(
        metrics=selection_rate,
        y_true=removed.astype(int),
        y_pred=removed.astype(int),
        sensitive_features=group_labels(groups).rename("g"),
    ).by_group
    assert {g.group: g.removal_rate for g in attr.groups} == pytest.approx(per_row.to_dict())
    assert sum(g.n for g in attr.groups) == 1500


def test_missing_values_form_an_unknown_group():
    labels = group_labels(["a", None, float("nan"), "  ", pd.NA, " b "])
    assert labels.tolist() == ["a", UNKNOWN_GROUP, UNKNOWN_GROUP, UNKNOWN_GROUP, UNKNOWN_GROUP, "b"]
    removed = [False] * 20 + [True] * 2 + [False] * 18
    values = ["a"] * 20 + [None] * 20
    attr = audit_arrays(removed, {"g": values}).attributes[0]
    assert {g.group: g.n_removed for g in attr.groups} == {"a": 0, UNKNOWN_GROUP: 2}


def test_small_groups_are_reported_but_not_judged():
    # 'tiny' (3 samples) is entirely removed; with min size 10 it must not trip the ratio.
    frame = build({"a": (100, 2), "b": (100, 2), "tiny": (3, 3)})
    result = audit_removals(frame, ["skin"], policy=AuditPolicy(min_group_size=10))
    skin = result.attributes[0]
    tiny = next(g for g in skin.groups if g.group == "tiny")
    assert (tiny.n, tiny.removal_rate, tiny.included) == (3, 1.0, False)
    assert skin.excluded_groups == ["tiny"]
    assert skin.retention_ratio == pytest.approx(1.0)
    assert result.passed
    assert any("tiny" in n and "not tested" in n for n in result.notes)
    # The same set judged with min size 1 fails: the tiny group keeps nothing.
    strict = audit_removals(frame, ["skin"], policy=AuditPolicy(min_group_size=1))
    assert strict.attributes[0].retention_ratio == 0.0 and not strict.passed


def test_effect_size_floor_ignores_negligible_but_significant_skew():
    # 1.0% vs 1.4% removal over 2 x 40k samples: p ~ 1e-7, but Cramér's V ~ 0.018.
    frame = build({"a": (40_000, 400), "b": (40_000, 560)})
    default = audit_removals(frame, ["skin"])
    assert default.attributes[0].p_value_holm < 1e-5 and not default.passed
    lenient = audit_removals(frame, ["skin"], policy=AuditPolicy(min_effect_size=0.05))
    assert lenient.attributes[0].cramers_v < 0.05 and lenient.passed


def test_no_removals_is_trivially_fair():
    result = audit_removals(build({"a": (50, 0), "b": (50, 0)}), ["skin"])
    assert result.passed and result.attributes[0].p_value == 1.0
    assert result.removal_rate == 0.0


def test_bad_inputs_are_refused():
    frame = build({"a": (20, 1), "b": (20, 1)})
    with pytest.raises(KeyError, match="nope"):
        audit_removals(frame, ["nope"])
    with pytest.raises(ValueError, match="boolean"):
        audit_arrays([0, 2, 1], {"g": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="missing"):
        audit_arrays(pd.Series([True, None], dtype="boolean"), {"g": ["a", "b"]})
    with pytest.raises(ValueError, match="values for"):
        audit_arrays([True, False], {"g": ["a"]})
    with pytest.raises(ValueError):
        audit_arrays([True], {})
