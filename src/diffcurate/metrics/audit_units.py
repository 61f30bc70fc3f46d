"""The counting unit of a fairness audit: distinct images (default) or samples.

Why it matters: memorization pruning removes duplicated images, and every copy of a flagged
image is removed with it. Counted on samples, removing 3 images that have 30 copies each reads
as 90 removals, and a group that lost 3 of its 300 images can look as if it lost a quarter of
itself. What a release changes about who is represented is the set of distinct images, so the
audit counts each exact-duplicate group once by default (``images``); ``samples`` counts copies,
which is what the training loss sees. When the two units disagree (a different verdict on some
attribute) the report carries both and says why: how many copies the removed images of the
group that differs most had.

Collapsing to images: a group's attribute value is its members' most common value (ties: the
smallest label), and an image counts as removed when any of its copies is removed (flagging
removes whole groups; with ``group_by none`` a partly removed image still loses copies).
Conflicting member values and partial removals are counted and reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict

from diffcurate.metrics.audit import AuditPolicy, AuditResult, audit_removals, group_labels

CountingUnit = Literal["images", "samples"]


class UnitComparison(BaseModel):
    """Why the two counting units disagree on one attribute.

    Attributes:
        attribute: The attribute.
        group: The group whose removal rate differs most between the units.
        rate_images: Its removal rate counted on distinct images.
        rate_samples: Its removal rate counted on samples.
        removed_images: Its removed distinct images.
        removed_samples: Its removed samples (copies included).
        explanation: One sentence for the reviewer.
    """

    model_config = ConfigDict(frozen=True)

    attribute: str
    group: str
    rate_images: float
    rate_samples: float
    removed_images: int
    removed_samples: int
    explanation: str


class UnitAudit(BaseModel):
    """The audit under the chosen unit, and under the other one where they disagree.

    Attributes:
        unit: The unit that decides (``images`` or ``samples``).
        result: The audit counted in ``unit``.
        other_unit: The other unit.
        other: The audit counted in ``other_unit`` (always computed; it is small).
        disagree: Attributes whose verdict differs between the units.
        comparisons: Why, per disagreeing attribute.
        n_images: Distinct images audited.
        n_samples: Samples audited.
        conflicting_images: Images whose copies carry different attribute values.
        partially_removed_images: Images with some copies removed and some kept.
    """

    model_config = ConfigDict(frozen=True)

    unit: CountingUnit
    result: AuditResult
    other_unit: CountingUnit
    other: AuditResult
    disagree: list[str]
    comparisons: list[UnitComparison]
    n_images: int
    n_samples: int
    conflicting_images: int
    partially_removed_images: int


def image_frame(
    frame: pd.DataFrame,
    attributes: Sequence[str],
    image_of: Mapping[str, str],
    *,
    removed: str = "removed",
    id_column: str = "sample_id",
) -> tuple[pd.DataFrame, int, int]:
    """Collapse a per-sample frame to one row per distinct image.

    Args:
        frame: One row per sample: ids, the removal flags and the attribute columns.
        attributes: Attribute columns to carry over.
        image_of: Sample id → image (exact-duplicate group); absent = an image of its own.
        removed: Boolean removal column.
        id_column: Sample id column.

    Returns:
        ``(images, conflicting, partial)``: one row per image with an ``image`` column, the
        attributes and ``removed``; how many images had conflicting attribute values; how many
        were partly removed.
    """
    ids = frame[id_column].astype(str)
    work = pd.DataFrame({"image": [image_of.get(i, i) for i in ids],
                         removed: frame[removed].astype(bool).to_numpy()})  # fmt: skip
    for a in attributes:
        work[a] = group_labels(frame[a]).to_numpy()
    grouped = work.groupby("image", sort=True)
    flags = grouped[removed].agg(["any", "all"])
    out = pd.DataFrame({"image": flags.index, removed: flags["any"].to_numpy()})
    conflicting: set[str] = set()
    for a in attributes:
        counts = work.groupby(["image", a]).size().reset_index(name="n")
        counts = counts.sort_values(["image", "n", a], ascending=[True, False, True])
        first = counts.drop_duplicates("image").set_index("image")[a]
        out[a] = first.reindex(out["image"]).to_numpy()
        multi = counts.groupby("image").size()
        conflicting.update(multi[multi > 1].index)
    partial = int((flags["any"] & ~flags["all"]).sum())
    return out.reset_index(drop=True), len(conflicting), partial


def audit_by_unit(
    frame: pd.DataFrame,
    attributes: Sequence[str],
    image_of: Mapping[str, str],
    *,
    unit: CountingUnit = "images",
    removed: str = "removed",
    id_column: str = "sample_id",
    policy: AuditPolicy | None = None,
) -> UnitAudit:
    """Audit a removal set counted on distinct images and on samples.

    Args:
        frame: One row per sample (see :func:`image_frame`).
        attributes: Attribute columns to audit.
        image_of: Sample id → exact-duplicate group.
        unit: The unit whose result decides.
        removed: Boolean removal column.
        id_column: Sample id column.
        policy: Thresholds (the same for both units).

    Returns:
        Both audits, which attributes they disagree on, and why.
    """
    images, conflicting, partial = image_frame(
        frame, attributes, image_of, removed=removed, id_column=id_column
    )
    by_images = audit_removals(images, attributes, removed=removed, policy=policy)
    by_samples = audit_removals(frame, attributes, removed=removed, policy=policy)
    chosen, other = (by_images, by_samples) if unit == "images" else (by_samples, by_images)
    disagree, comparisons = [], []
    for a_img, a_smp in zip(by_images.attributes, by_samples.attributes, strict=True):
        verdict_img = (a_img.ratio_violation, a_img.dependence_violation)
        verdict_smp = (a_smp.ratio_violation, a_smp.dependence_violation)
        if verdict_img != verdict_smp:
            disagree.append(a_img.attribute)
            comparisons.append(_compare(a_img.attribute, a_img.groups, a_smp.groups))
    return UnitAudit(
        unit=unit,
        result=chosen,
        other_unit="samples" if unit == "images" else "images",
        other=other,
        disagree=disagree,
        comparisons=comparisons,
        n_images=len(images),
        n_samples=len(frame),
        conflicting_images=conflicting,
        partially_removed_images=partial,
    )


def _compare(attribute: str, img_groups: list, smp_groups: list) -> UnitComparison:
    """The group whose removal rate differs most between units, in words."""
    smp = {g.group: g for g in smp_groups}
    best = max(
        (g for g in img_groups if g.group in smp),
        key=lambda g: (abs(smp[g.group].removal_rate - g.removal_rate), g.group),
    )
    s = smp[best.group]
    copies = s.n_removed / best.n_removed if best.n_removed else 0.0
    explanation = (
        f"{attribute}: '{best.group}' loses {best.removal_rate:.1%} of its distinct images "
        f"({best.n_removed} of {best.n}) but {s.removal_rate:.1%} of its samples "
        f"({s.n_removed} of {s.n})"
    )
    if best.n_removed:
        explanation += f": its removed images have {copies:.1f} copies each on average"
    return UnitComparison(
        attribute=attribute,
        group=best.group,
        rate_images=best.removal_rate,
        rate_samples=s.removal_rate,
        removed_images=best.n_removed,
        removed_samples=s.n_removed,
        explanation=explanation,
    )
