"""Fairness audit of a removal set: does pruning change who is represented?

Pruning the riskiest 1% of a corpus is only acceptable if it does not quietly remove one group of
people (or styles, or sources) much more than the others. For every group attribute (a metadata
column, or a CLIP zero-shot label) the audit reports:

- per-group counts and removal (selection) rates, computed with fairlearn's ``MetricFrame`` and
  ``selection_rate`` so that the numbers are the ones the fairness tooling reports elsewhere;
- retention rates ``1 - removal rate`` and the retention-rate ratio ``min / max`` over groups:
  the four-fifths rule of US employment practice, a violation when the ratio is below 0.8
  (configurable). The ratio is taken on *retention* because retention is the "favourable
  outcome" for a group's representation in the released data;
- a test of independence of group and removal on the ``group x {kept, removed}`` contingency
  table: Pearson's chi-square (no Yates correction), or Fisher's exact test for a 2x2 table with
  any expected count below 5, where the chi-square approximation is poor;
- Holm's step-down correction of those p-values across attributes (one hypothesis per
  attribute), because an audit of many attributes would otherwise find "significant" skew by
  chance;
- Cramér's V from the uncorrected Pearson statistic (the classical, *bias-uncorrected*
  estimator, not Bergsma's correction), as an effect size to read beside the p-value.

Why both a ratio and a test: at a 1% removal rate every retention rate is near 0.99, so the
four-fifths ratio almost never trips even when one group loses three times its share; the test
catches that. Conversely, a tiny group can have a bad ratio that is not significant. The audit
fails on either (the test only where Cramér's V reaches ``AuditPolicy.min_effect_size``).

Missing group values (None, NaN, empty strings) become an explicit ``"unknown"`` group rather
than being dropped: dropping them would hide removals from the audit. Groups smaller than
``min_group_size`` are reported but take part in neither the ratio nor the test, because their
rates are too noisy to judge; the result says which groups were left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, selection_rate
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import chi2_contingency, fisher_exact

UNKNOWN_GROUP = "unknown"
"""Label given to missing or empty group values."""


class AuditPolicy(BaseModel):
    """Thresholds that decide whether a removal set passes the fairness audit.

    Attributes:
        version: Recorded with every result so that a ledger entry says which rules judged it.
        min_retention_ratio: Four-fifths rule: fail when min/max group retention is below this.
        alpha: Family-wise error rate for the Holm-corrected independence tests.
        min_group_size: Groups with fewer samples are reported but neither tested nor used in
            the ratio (their rates are too noisy to act on).
        min_expected_count: A 2x2 table with any expected count below this uses Fisher's exact
            test instead of chi-square (Cochran's rule of thumb: 5).
        min_effect_size: A significant test is a violation only when Cramér's V is at least
            this; 0 means any significant dependence fails. Raise it for very large corpora, where
            negligible differences become significant.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = "audit-v1"
    min_retention_ratio: float = Field(0.8, gt=0.0, le=1.0)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    min_group_size: int = Field(10, ge=1)
    min_expected_count: float = Field(5.0, ge=0.0)
    min_effect_size: float = Field(0.0, ge=0.0, le=1.0)


class GroupRow(BaseModel):
    """One group of one attribute.

    Attributes:
        group: Group label (``"unknown"`` for missing values).
        n: Samples in the group.
        n_removed: Samples of the group in the removal set.
        removal_rate: ``n_removed / n`` (fairlearn ``selection_rate``).
        retention_rate: ``1 - removal_rate``.
        included: Whether the group is large enough to enter the ratio and the test.
    """

    model_config = ConfigDict(frozen=True)

    group: str
    n: int
    n_removed: int
    removal_rate: float
    retention_rate: float
    included: bool


class AttributeAudit(BaseModel):
    """The audit of one group attribute.

    Attributes:
        attribute: Column name.
        groups: Every group, largest first; small groups have ``included=False``.
        excluded_groups: Labels of groups below ``min_group_size``.
        retention_ratio: min/max retention over included groups; None with fewer than two.
        lowest_group: Included group with the lowest retention.
        highest_group: Included group with the highest retention.
        test: ``"chi2"``, ``"fisher"``, or ``"none"`` (fewer than two included groups).
        chi2: Pearson chi-square statistic (uncorrected) on the included groups' table.
        dof: Degrees of freedom of the chi-square test.
        p_value: Raw p-value of the test used.
        p_value_holm: Holm-adjusted p-value across the audited attributes.
        cramers_v: Bias-uncorrected Cramér's V, ``sqrt(chi2 / (n * (min(r, c) - 1)))``.
        ratio_violation: ``retention_ratio < min_retention_ratio``.
        dependence_violation: Holm-adjusted p < alpha and Cramér's V >= min_effect_size.
        notes: Caveats, e.g. small expected counts in a larger-than-2x2 table.
    """

    model_config = ConfigDict(frozen=True)

    attribute: str
    groups: list[GroupRow]
    excluded_groups: list[str]
    retention_ratio: float | None
    lowest_group: str | None
    highest_group: str | None
    test: Literal["chi2", "fisher", "none"]
    chi2: float | None
    dof: int | None
    p_value: float | None
    p_value_holm: float | None
    cramers_v: float | None
    ratio_violation: bool
    dependence_violation: bool
    notes: list[str]


class AuditResult(BaseModel):
    """The fairness audit of one removal set.

    Attributes:
        policy: The policy that judged it (its ``version`` goes to the ledger).
        n_samples: Samples audited.
        n_removed: Samples in the removal set.
        removal_rate: Corpus-wide removal rate.
        attributes: One entry per attribute, in the order given.
        passed: No attribute has a ratio or dependence violation.
        violations: Human-readable sentences, one per violation, for the reviewer.
        notes: Everything a reviewer should know that is not a violation.
    """

    model_config = ConfigDict(frozen=True)

    policy: AuditPolicy
    n_samples: int
    n_removed: int
    removal_rate: float
    attributes: list[AttributeAudit]
    passed: bool
    violations: list[str]
    notes: list[str]


def group_labels(values: ArrayLike | pd.Series) -> pd.Series:
    """Group values as strings, with missing or blank values mapped to ``"unknown"``.

    A real group literally called ``"unknown"`` merges with the missing values; that is intended
    (both mean "we do not know").
    """
    raw = values.tolist() if isinstance(values, pd.Series) else list(np.asarray(values, object))
    labels = []
    for v in raw:
        text = UNKNOWN_GROUP if _is_missing(v) else str(v).strip()
        labels.append(text or UNKNOWN_GROUP)
    return pd.Series(labels, dtype=object)


def holm_adjust(p_values: Sequence[float] | ArrayLike) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values, in the input order.

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting
    where the adjusted value is below alpha controls the family-wise error rate at alpha under
    any dependence between the tests. Hand-written (a few lines) because statsmodels is not a
    dependency, and scipy ships only Benjamini-Hochberg/Yekutieli (``false_discovery_control``),
    which control the false discovery rate, a weaker guarantee than an audit needs.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return p
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(1.0, stepped)
    return out


def cramers_v(chi2: float, n: int, shape: tuple[int, int]) -> float:
    """Bias-uncorrected Cramér's V of an ``r x c`` table with Pearson statistic ``chi2``."""
    k = min(shape) - 1
    if n <= 0 or k <= 0:
        return 0.0
    return math.sqrt(max(chi2, 0.0) / (n * k))


def audit_removals(
    frame: pd.DataFrame,
    attributes: Sequence[str],
    *,
    removed: str = "removed",
    policy: AuditPolicy | None = None,
) -> AuditResult:
    """Audit a removal set given as one row per sample.

    Args:
        frame: One row per sample: a boolean ``removed`` column and the attribute columns.
        attributes: Group-attribute columns to audit (strings; missing values allowed).
        removed: Name of the boolean column marking the removal set.
        policy: Thresholds; defaults to :class:`AuditPolicy()`.

    Returns:
        Per-attribute statistics, Holm-adjusted across attributes, and the overall decision.

    Raises:
        ValueError: Empty frame, no attributes, or a ``removed`` column that is not boolean.
        KeyError: A named column is missing.
    """
    missing = [c for c in [removed, *attributes] if c not in frame.columns]
    if missing:
        raise KeyError(f"audit columns not in the frame: {missing}")
    return audit_arrays(frame[removed], {a: frame[a] for a in attributes}, policy=policy)


def audit_arrays(
    removed: ArrayLike | pd.Series,
    groups: Mapping[str, ArrayLike | pd.Series],
    *,
    policy: AuditPolicy | None = None,
) -> AuditResult:
    """Audit a removal set given as a boolean vector and one group vector per attribute.

    See :func:`audit_removals`; this is the same audit for callers holding arrays.
    """
    policy = policy or AuditPolicy()
    flags = _as_removed(removed)
    if flags.size == 0:
        raise ValueError("cannot audit an empty sample set")
    if not groups:
        raise ValueError("no group attributes to audit")
    for name, values in groups.items():
        if len(values) != flags.size:
            raise ValueError(f"{name!r} has {len(values)} values for {flags.size} samples")

    partial = [_audit_attribute(name, flags, group_labels(v), policy) for name, v in groups.items()]
    tested = [i for i, a in enumerate(partial) if a.p_value is not None]
    adjusted = holm_adjust([partial[i].p_value for i in tested])
    holm = dict(zip(tested, adjusted.tolist(), strict=True))

    attributes, violations, notes = [], [], []
    for i, a in enumerate(partial):
        p_holm = holm.get(i)
        dependent = (
            p_holm is not None
            and p_holm < policy.alpha
            and (a.cramers_v or 0.0) >= policy.min_effect_size
        )
        a = a.model_copy(update={"p_value_holm": p_holm, "dependence_violation": dependent})
        attributes.append(a)
        violations.extend(_violation_sentences(a, policy))
        notes.extend(f"{a.attribute}: {n}" for n in a.notes)

    return AuditResult(
        policy=policy,
        n_samples=int(flags.size),
        n_removed=int(flags.sum()),
        removal_rate=float(flags.mean()),
        attributes=attributes,
        passed=not violations,
        violations=violations,
        notes=notes,
    )


def _audit_attribute(
    name: str, flags: np.ndarray, labels: pd.Series, policy: AuditPolicy
) -> AttributeAudit:
    """Everything for one attribute except the Holm adjustment (which needs all attributes)."""
    # fairlearn evaluates metrics row by row in Python (~30 us a row), too slow for corpora of
    # millions. selection_rate takes sample weights, so we hand MetricFrame the distinct
    # (group, removed) cells weighted by their counts: the same rates, in O(groups).
    cells = (
        pd.DataFrame({"group": labels.to_numpy(), "removed": flags})
        .value_counts()
        .reset_index(name="n")
    )
    outcome = cells["removed"].astype(int).to_numpy()
    frame = MetricFrame(
        metrics={"removal_rate": selection_rate},
        y_true=outcome,
        y_pred=outcome,
        sensitive_features=cells["group"].rename(name),
        sample_params={"removal_rate": {"sample_weight": cells["n"].to_numpy()}},
    )
    sizes = cells.groupby("group")["n"].sum()
    removed_n = cells[cells["removed"]].groupby("group")["n"].sum()
    rows = []
    for group, rate in frame.by_group["removal_rate"].items():
        n = int(sizes[group])
        rows.append(
            GroupRow(
                group=str(group),
                n=n,
                n_removed=int(removed_n.get(group, 0)),
                removal_rate=float(rate),
                retention_rate=1.0 - float(rate),
                included=n >= policy.min_group_size,
            )
        )
    rows.sort(key=lambda r: (-r.n, r.group))
    included = sorted((r for r in rows if r.included), key=lambda r: r.group)
    excluded = sorted(r.group for r in rows if not r.included)
    notes = []
    if excluded:
        notes.append(
            f"groups below the minimum size {policy.min_group_size} are reported but not "
            f"tested and not in the retention ratio: {', '.join(excluded)}"
        )

    ratio = lowest = highest = None
    if len(included) >= 2:
        lo = min(included, key=lambda r: (r.retention_rate, r.group))
        hi = min(included, key=lambda r: (-r.retention_rate, r.group))  # ties: first by name
        lowest, highest = lo.group, hi.group
        # Every included group fully removed is equal treatment, not a division by zero.
        ratio = 1.0 if hi.retention_rate == 0 else lo.retention_rate / hi.retention_rate
    else:
        notes.append("fewer than two groups of the minimum size: no ratio and no test")

    test, chi2, dof, p_value, v = "none", None, None, None, None
    if len(included) >= 2:
        table = np.array([[r.n - r.n_removed, r.n_removed] for r in included], dtype=np.int64)
        test, chi2, dof, p_value, v, more = _independence_test(table, policy)
        notes.extend(more)

    return AttributeAudit(
        attribute=name,
        groups=rows,
        excluded_groups=excluded,
        retention_ratio=ratio,
        lowest_group=lowest,
        highest_group=highest,
        test=test,
        chi2=chi2,
        dof=dof,
        p_value=p_value,
        p_value_holm=None,
        cramers_v=v,
        ratio_violation=ratio is not None and ratio < policy.min_retention_ratio,
        dependence_violation=False,
        notes=notes,
    )


def independence_test(
    table: np.ndarray, policy: AuditPolicy
) -> tuple[Literal["chi2", "fisher"], float, int, float, float, list[str]]:
    """The audit's test of independence on any ``r x 2`` contingency table.

    Public for the other audits that reuse it (the generations audit tests ``group x {before,
    after}``), so that one rule picks chi-square or Fisher everywhere. Returns ``(test, chi2,
    dof, p_value, cramers_v, notes)``.
    """
    return _independence_test(table, policy)


def _independence_test(
    table: np.ndarray, policy: AuditPolicy
) -> tuple[Literal["chi2", "fisher"], float, int, float, float, list[str]]:
    """Chi-square (or Fisher for a sparse 2x2) test of group x {kept, removed}.

    Returns ``(test, chi2, dof, p_value, cramers_v, notes)``.
    """
    n = int(table.sum())
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    if (table.sum(axis=0) == 0).any():
        # Nothing removed (or everything removed) among the included groups: removal cannot
        # depend on the group. scipy would reject the table for its zero expected counts.
        note = "no variation in removal among the tested groups: independent by construction"
        return "chi2", 0.0, dof, 1.0, 0.0, [note]
    res = chi2_contingency(table, correction=False)
    chi2, expected = float(res.statistic), np.asarray(res.expected_freq)
    v = cramers_v(chi2, n, table.shape)
    sparse = int((expected < policy.min_expected_count).sum())
    if table.shape == (2, 2) and sparse:
        p = float(fisher_exact(table, alternative="two-sided").pvalue)
        return "fisher", chi2, dof, p, v, []
    notes = []
    if sparse:
        notes.append(
            f"{sparse} of {expected.size} expected counts are below "
            f"{policy.min_expected_count:g}; the chi-square p-value is approximate"
        )
    return "chi2", chi2, dof, float(res.pvalue), v, notes


def _violation_sentences(a: AttributeAudit, policy: AuditPolicy) -> list[str]:
    out = []
    if a.ratio_violation:
        lo = next(g for g in a.groups if g.group == a.lowest_group)
        hi = next(g for g in a.groups if g.group == a.highest_group)
        out.append(
            f"{a.attribute}: retention-rate ratio {a.retention_ratio:.3f} < "
            f"{policy.min_retention_ratio:g} (four-fifths rule): '{lo.group}' keeps "
            f"{lo.retention_rate:.1%} of {lo.n}, '{hi.group}' keeps {hi.retention_rate:.1%} "
            f"of {hi.n}"
        )
    if a.dependence_violation:
        worst = max((g for g in a.groups if g.included), key=lambda g: (g.removal_rate, g.group))
        out.append(
            f"{a.attribute}: removal depends on the group ({a.test} p={a.p_value:.3g}, "
            f"Holm-adjusted p={a.p_value_holm:.3g} < alpha={policy.alpha:g}, "
            f"Cramér's V={a.cramers_v:.3f}); highest removal rate: '{worst.group}' "
            f"{worst.removal_rate:.2%} of {worst.n}"
        )
    return out


def _as_removed(values: ArrayLike | pd.Series) -> np.ndarray:
    """The removal flags as a bool array; refuses anything but booleans or 0/1."""
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    if series.isna().any():
        raise ValueError("the removed column has missing values")
    if series.dtype != bool and not set(pd.unique(series)) <= {0, 1}:
        raise ValueError("the removed column must be boolean (or 0/1)")
    return series.astype(bool).to_numpy()


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-like values: not a scalar missing marker
        return False
