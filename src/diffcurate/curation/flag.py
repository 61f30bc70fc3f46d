"""Candidate removal set from per-sample risk scores.

Scores follow the :mod:`diffcurate.influence` convention: **higher = riskier**. Two selection
modes:

- ``top_fraction``: the ``ceil(rho * n)`` highest scores (default rho = 1%, as in seed 000's
  "prune the top rho%"). Ties are broken by ascending sample id so that the same scores always
  give the same set, whatever order the shards arrived in.
- ``threshold``: every sample with ``score >= threshold``.

Optional fairness cap: no group may lose more than ``cap x`` the corpus-wide removal rate, i.e.
at most ``floor(cap * rate * n_group)`` samples, where ``rate`` is the unconstrained target rate
(``k / n``). Selection walks the scores from the top and skips a sample whose group has reached
its cap; skipped samples are reported with the reason, so a reviewer sees the risky images the
cap kept. In ``top_fraction`` mode with ``refill=True`` (default) the walk continues past the
first ``k`` so the set still holds ``k`` samples where the caps allow it; keeping the overall
rate at ``k / n`` is what makes "cap x the corpus rate" a true statement about the result. In
``threshold`` mode the walk never goes below the threshold. A group small enough that its cap
rounds down to 0 loses nothing: that is the cap working, not a bug.

Missing group values are the explicit ``"unknown"`` group, as in the fairness audit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffcurate.metrics.audit import group_labels


class FlagPolicy(BaseModel):
    """How the candidate removal set is chosen.

    Attributes:
        mode: ``"top_fraction"`` or ``"threshold"``.
        fraction: rho for ``top_fraction`` (0.01 = 1%); the count is ``ceil(rho * n)``.
        threshold: Score at or above which a sample is flagged (``threshold`` mode).
        fairness_cap: Per-group removal rate limit as a multiple (>= 1) of the corpus rate;
            None disables the cap.
        refill: In ``top_fraction`` mode, replace capped samples by the next-highest scores so
            that the set keeps its size.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["top_fraction", "threshold"] = "top_fraction"
    fraction: float = Field(0.01, gt=0.0, le=1.0)
    threshold: float | None = None
    fairness_cap: float | None = Field(None, ge=1.0)
    refill: bool = True

    @model_validator(mode="after")
    def _threshold_given(self) -> FlagPolicy:
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("mode 'threshold' needs a threshold")
        return self


class SkippedSample(BaseModel):
    """A sample the selection passed over because of the fairness cap."""

    model_config = ConfigDict(frozen=True)

    sample_id: str
    score: float
    group: str
    reason: str


class FlagResult(BaseModel):
    """The candidate removal set and how it was chosen.

    Attributes:
        policy: The policy applied.
        n_samples: Scored samples.
        target_count: Size the set would have without the cap (``ceil(rho n)`` or the number
            at or above the threshold).
        corpus_rate: ``target_count / n_samples``: the rate the cap multiplies.
        flagged_ids: The removal set, highest score first.
        min_flagged_score: Lowest score in the set (None if empty).
        skipped: Samples passed over by the cap, in walk order.
        group_caps: Maximum removals per group (empty without a cap).
        flagged_by_group: Removals per group (empty without groups).
        notes: Shortfalls and other facts for the reviewer.
    """

    model_config = ConfigDict(frozen=True)

    policy: FlagPolicy
    n_samples: int
    target_count: int
    corpus_rate: float
    flagged_ids: list[str]
    min_flagged_score: float | None
    skipped: list[SkippedSample]
    group_caps: dict[str, int]
    flagged_by_group: dict[str, int]
    notes: list[str]


def select_removals(
    sample_ids: Sequence[str],
    scores: ArrayLike,
    *,
    policy: FlagPolicy | None = None,
    groups: Sequence[object] | ArrayLike | None = None,
) -> FlagResult:
    """Choose the candidate removal set.

    Args:
        sample_ids: Unique sample ids, aligned with ``scores``.
        scores: Risk scores, higher = riskier; must be finite.
        policy: Selection policy; defaults to the top 1% without a cap.
        groups: Group label per sample; required when ``policy.fairness_cap`` is set.

    Returns:
        The flagged ids, the samples skipped by the cap with reasons, and per-group counts.

    Raises:
        ValueError: Misaligned inputs, duplicate ids, non-finite scores, or a cap without
            groups.
    """
    policy = policy or FlagPolicy()
    ids = [str(s) for s in sample_ids]
    vals = np.asarray(scores, dtype=np.float64).ravel()
    n = len(ids)
    if n == 0:
        raise ValueError("no samples to flag")
    if vals.shape != (n,):
        raise ValueError(f"{vals.size} scores for {n} sample ids")
    if len(set(ids)) != n:
        dup = sorted(k for k, c in Counter(ids).items() if c > 1)
        raise ValueError(f"duplicate sample ids: {dup[:10]}")
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
        raise ValueError(f"non-finite scores for samples {[ids[i] for i in bad[:10]]}")
    labels = None if groups is None else group_labels(groups).tolist()
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} group labels for {n} samples")
    if policy.fairness_cap is not None and labels is None:
        raise ValueError("a fairness cap needs a group label per sample")

    order = np.lexsort((np.asarray(ids, dtype=str), -vals))  # score desc, then id asc
    if policy.mode == "threshold":
        assert policy.threshold is not None  # guaranteed by the validator
        walk = order[vals[order] >= policy.threshold]
        target = int(walk.size)
    else:
        target = min(n, math.ceil(round(policy.fraction * n, 9)))
        walk = order if policy.refill and policy.fairness_cap is not None else order[:target]
    rate = target / n

    sizes = Counter(labels or [])
    caps: dict[str, int] = {}
    if policy.fairness_cap is not None:
        caps = {
            g: math.floor(policy.fairness_cap * rate * size + 1e-9)
            for g, size in sorted(sizes.items())
        }

    flagged: list[int] = []
    skipped: list[SkippedSample] = []
    taken: Counter[str] = Counter()
    for i in walk.tolist():
        if len(flagged) == target:
            break
        group = labels[i] if labels is not None else ""
        if caps and taken[group] >= caps[group]:
            skipped.append(
                SkippedSample(
                    sample_id=ids[i],
                    score=float(vals[i]),
                    group=group,
                    reason=(
                        f"group '{group}' is at its cap of {caps[group]} removals "
                        f"({policy.fairness_cap:g} x corpus rate {rate:.2%} of "
                        f"{sizes[group]} samples)"
                    ),
                )
            )
            continue
        flagged.append(i)
        taken[group] += 1

    notes = []
    if len(flagged) < target:
        notes.append(
            f"fairness cap left the set {target - len(flagged)} short of {target}: the group "
            f"caps allow {sum(caps.values())} removals"
            + ("" if policy.mode == "top_fraction" else " at or above the threshold")
        )
    by_group = {}
    if labels is not None:
        counts = Counter(labels[i] for i in flagged)
        by_group = {g: counts.get(g, 0) for g in sorted(set(labels))}
    return FlagResult(
        policy=policy,
        n_samples=n,
        target_count=target,
        corpus_rate=rate,
        flagged_ids=[ids[i] for i in flagged],
        min_flagged_score=float(vals[flagged[-1]]) if flagged else None,
        skipped=skipped,
        group_caps=caps,
        flagged_by_group=by_group,
        notes=notes,
    )
