"""Fairness cost on generations: does the candidate model still produce every group?

The removal-set audit asks whether pruning removed one group's *training images* more than
others'. A mitigation can also erase a group from the model's *outputs* without any skew in
what was removed (a fine-tune that unlearns a concept, a retrain whose smaller data no longer
supports a rare group). So the gate generates from the original and the candidate model, from
the same keyed noises and prompts, labels both sets with the same inferred attributes
(:mod:`diffcurate.metrics.inferred_attributes`), and compares each group's share.

Per attribute:

- each group's share of the generations before and after, and the share ratio
  ``after / before``;
- the test of the removal audit, now on the ``{before, after} x group`` table: Pearson's
  chi-square, or Fisher's exact test for a sparse 2x2 table, with Holm's correction across
  attributes and Cramér's V. The two sets share their noises, so they are positively
  correlated; a test that treats them as independent overstates the variance of the change and
  is conservative: a change it calls significant is real;
- a violation when some tested group's share ratio falls below ``min_share_ratio`` *and* the
  change is significant (Holm-adjusted p < alpha, V >= ``min_effect_size``). Both: a ratio
  alone fires on a small group's noise, a test alone on a negligible but significant drift.
  A group erased from the outputs (ratio 0) with enough generations before fails both.

Groups with fewer than ``min_group_size`` generations before the mitigation are reported but
not judged (a share of 3 generations cannot be told from noise), and the "no group" labels
(``uncertain``, ``unknown``, ``multiple``) are tested but never judged as erased: fewer
uncertain labels is not a group disappearing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.metrics.audit import AuditPolicy as _TestPolicy
from diffcurate.metrics.audit import group_labels, holm_adjust, independence_test
from diffcurate.metrics.inferred_attributes import NO_LABEL_GROUPS


class GenerationsAuditPolicy(BaseModel):
    """When a change in group shares between the two models is a violation.

    Attributes:
        version: Recorded with every result.
        min_share_ratio: Smallest acceptable ``share after / share before`` of a judged group.
        alpha: Family-wise error rate of the Holm-corrected tests.
        min_group_size: Generations a group needs before the mitigation to be judged.
        min_expected_count: A sparse 2x2 table uses Fisher's exact test below this.
        min_effect_size: Smallest Cramér's V of a violation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = "gen-audit-v1"
    min_share_ratio: float = Field(0.5, ge=0.0, le=1.0)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    min_group_size: int = Field(10, ge=1)
    min_expected_count: float = Field(5.0, ge=0.0)
    min_effect_size: float = Field(0.0, ge=0.0, le=1.0)


class GroupShare(BaseModel):
    """One group's share of the generations of both models.

    Attributes:
        group: Group label.
        n_before: Generations of the original model in the group.
        n_after: Generations of the candidate model in the group.
        share_before: ``n_before / generations before``.
        share_after: ``n_after / generations after``.
        share_ratio: ``share_after / share_before`` (None when the group had none before).
        judged: Whether the group's ratio can fail the attribute (large enough, a real group).
    """

    model_config = ConfigDict(frozen=True)

    group: str
    n_before: int
    n_after: int
    share_before: float
    share_after: float
    share_ratio: float | None
    judged: bool


class GenerationsAttributeAudit(BaseModel):
    """The generations audit of one attribute.

    Attributes:
        attribute: Attribute name.
        groups: Every group, largest before first.
        lowest_group: The judged group with the lowest share ratio.
        lowest_share_ratio: Its ratio (None: no judged group).
        test: ``chi2``, ``fisher`` or ``none`` (fewer than two groups with generations).
        chi2: Pearson statistic of the ``model x group`` table.
        dof: Degrees of freedom.
        p_value: Raw p-value.
        p_value_holm: Holm-adjusted across attributes.
        cramers_v: Effect size.
        violation: A judged group's ratio below the limit, and a significant change.
        notes: Caveats.
    """

    model_config = ConfigDict(frozen=True)

    attribute: str
    groups: list[GroupShare]
    lowest_group: str | None
    lowest_share_ratio: float | None
    test: str
    chi2: float | None
    dof: int | None
    p_value: float | None
    p_value_holm: float | None
    cramers_v: float | None
    violation: bool
    notes: list[str]


class GenerationsAuditResult(BaseModel):
    """The generations audit of a candidate model against the original.

    Attributes:
        policy: The policy that judged it.
        n_before: Generations of the original model.
        n_after: Generations of the candidate.
        attributes: One entry per attribute.
        passed: No attribute has a violation.
        violations: Sentences, one per violation.
        lowest_share_ratio: The lowest judged share ratio over attributes (the gate's value).
    """

    model_config = ConfigDict(frozen=True)

    policy: GenerationsAuditPolicy
    n_before: int
    n_after: int
    attributes: list[GenerationsAttributeAudit]
    passed: bool
    violations: list[str]
    lowest_share_ratio: float | None


def audit_generations(
    before: Mapping[str, Sequence[object]],
    after: Mapping[str, Sequence[object]],
    policy: GenerationsAuditPolicy | None = None,
) -> GenerationsAuditResult:
    """Compare group shares of the original's and the candidate's generations.

    Args:
        before: Attribute → one label per generation of the original model.
        after: Attribute → one label per generation of the candidate (same attributes).
        policy: Thresholds.

    Returns:
        Per-attribute shares, tests (Holm-adjusted across attributes) and the decision.

    Raises:
        ValueError: No attributes, different attributes, or label lists of unequal lengths
            within one model.
    """
    policy = policy or GenerationsAuditPolicy()
    if not before:
        raise ValueError("no attributes to audit on generations")
    if set(before) != set(after):
        raise ValueError(f"attributes differ: {sorted(before)} vs {sorted(after)}")
    n0 = {len(v) for v in before.values()}
    n1 = {len(v) for v in after.values()}
    if len(n0) != 1 or len(n1) != 1 or 0 in n0 | n1:
        raise ValueError("every attribute needs one label per generation of each model")
    partial = [_attribute(a, before[a], after[a], policy) for a in before]
    tested = [i for i, a in enumerate(partial) if a.p_value is not None]
    adjusted = dict(zip(tested, holm_adjust([partial[i].p_value for i in tested]).tolist(),
                        strict=True))  # fmt: skip
    attributes, violations = [], []
    for i, a in enumerate(partial):
        p_holm = adjusted.get(i)
        significant = (
            p_holm is not None
            and p_holm < policy.alpha
            and (a.cramers_v or 0.0) >= policy.min_effect_size
        )
        low = a.lowest_share_ratio is not None and a.lowest_share_ratio < policy.min_share_ratio
        a = a.model_copy(update={"p_value_holm": p_holm, "violation": bool(significant and low)})
        attributes.append(a)
        if a.violation:
            g = next(x for x in a.groups if x.group == a.lowest_group)
            violations.append(
                f"{a.attribute}: '{g.group}' falls from {g.share_before:.1%} of the original "
                f"model's generations ({g.n_before}) to {g.share_after:.1%} ({g.n_after}), "
                f"ratio {a.lowest_share_ratio:.2f} < {policy.min_share_ratio:g} ({a.test} "
                f"Holm-adjusted p={p_holm:.3g} < {policy.alpha:g})"
            )
    ratios = [a.lowest_share_ratio for a in attributes if a.lowest_share_ratio is not None]
    return GenerationsAuditResult(
        policy=policy,
        n_before=n0.pop(),
        n_after=n1.pop(),
        attributes=attributes,
        passed=not violations,
        violations=violations,
        lowest_share_ratio=min(ratios) if ratios else None,
    )


def _attribute(
    name: str, before: Sequence[object], after: Sequence[object], policy: GenerationsAuditPolicy
) -> GenerationsAttributeAudit:
    b = group_labels(np.asarray(before, dtype=object)).value_counts()
    a = group_labels(np.asarray(after, dtype=object)).value_counts()
    n_b, n_a = int(b.sum()), int(a.sum())
    rows = []
    for g in sorted(set(b.index) | set(a.index)):
        kb, ka = int(b.get(g, 0)), int(a.get(g, 0))
        sb, sa = kb / n_b, ka / n_a
        rows.append(GroupShare(
            group=str(g), n_before=kb, n_after=ka, share_before=sb, share_after=sa,
            share_ratio=sa / sb if kb else None,
            judged=kb >= policy.min_group_size and g not in NO_LABEL_GROUPS,
        ))  # fmt: skip
    rows.sort(key=lambda r: (-r.n_before, r.group))
    judged = [r for r in rows if r.judged]
    lowest = min(judged, key=lambda r: (r.share_ratio, r.group)) if judged else None
    notes = []
    small = sorted(r.group for r in rows if r.n_before < policy.min_group_size)
    if small:
        notes.append(f"groups with fewer than {policy.min_group_size} generations before are "
                     f"not judged: {', '.join(small)}")  # fmt: skip
    test, chi2, dof, p, v = "none", None, None, None, None
    if len(rows) >= 2:
        table = np.array([[r.n_before for r in rows], [r.n_after for r in rows]]).T
        test_policy = _TestPolicy(min_expected_count=policy.min_expected_count)
        test, chi2, dof, p, v, more = independence_test(table.astype(np.int64), test_policy)
        notes.extend(more)
    else:
        notes.append("one group in both models' generations: nothing to compare")
    return GenerationsAttributeAudit(
        attribute=name, groups=rows, lowest_group=None if lowest is None else lowest.group,
        lowest_share_ratio=None if lowest is None else lowest.share_ratio, test=test, chi2=chi2,
        dof=dof, p_value=p, p_value_holm=None, cramers_v=v, violation=False, notes=notes,
    )  # fmt: skip
