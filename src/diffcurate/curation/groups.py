"""Flag whole duplicate groups: rank distinct images, remove every copy of a flagged one.

Why: memorization is driven by duplication (Carlini et al. 2023; Somepalli et al. 2023). A
planted image copied 30 times yields 30 samples with near-identical risk scores; ranking samples
would spend the whole top-ρ% budget on the copies of two or three images, and removing some
copies of an image while keeping others leaves it duplicated. So the flag step ranks *distinct*
images (one representative per exact-duplicate group, scored by the group's maximum, i.e. the
riskiest copy) and then expands each flagged representative to all its copies.

Exact groups come from ingest's ``duplicates`` table (identical bytes). Near-duplicate groups
can be used too (``near``), but perceptual-hash components also join naturally similar images
(on the digits demo, 62 near groups cover 434 ordinary samples), so it is opt-in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

GroupBy = Literal["exact", "near", "none"]


@dataclass(frozen=True)
class CollapsedScores:
    """One row per group: the representative id, the group's max score, its members."""

    representatives: list[str]
    scores: np.ndarray
    members: dict[str, list[str]]

    def expand(self, flagged_representatives: Sequence[str]) -> list[str]:
        """All member ids of the flagged groups, in flag order then member order."""
        out: list[str] = []
        for rep in flagged_representatives:
            out.extend(self.members[rep])
        return out


def collapse_groups(
    sample_ids: Sequence[str], scores: Sequence[float] | np.ndarray, group_of: Mapping[str, str]
) -> CollapsedScores:
    """Collapse samples into groups (``group_of[sample_id]``; absent = its own group).

    The representative of a group is its highest-scoring member (ties: smallest id), and the
    group's score is that maximum.

    Raises:
        ValueError: ``sample_ids`` and ``scores`` differ in length or ids repeat.
    """
    ids = [str(s) for s in sample_ids]
    vals = np.asarray(scores, dtype=np.float64).ravel()
    if vals.shape != (len(ids),):
        raise ValueError(f"{vals.size} scores for {len(ids)} sample ids")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate sample ids")
    best: dict[str, tuple[float, str]] = {}
    members: dict[str, list[str]] = {}
    for sid, v in zip(ids, vals, strict=True):
        g = group_of.get(sid, sid)
        members.setdefault(g, []).append(sid)
        cur = best.get(g)
        if cur is None or v > cur[0] or (v == cur[0] and sid < cur[1]):
            best[g] = (float(v), sid)
    reps = [best[g][1] for g in members]
    return CollapsedScores(
        representatives=reps,
        scores=np.array([best[g][0] for g in members], dtype=np.float64),
        members={best[g][1]: sorted(members[g]) for g in members},
    )
