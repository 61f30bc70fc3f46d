"""Counting unit of the audit: distinct images vs samples on a corpus with planted duplicates,
hand-computed."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy import stats

from diffcurate.metrics.audit_units import audit_by_unit, image_frame


def planted() -> tuple[pd.DataFrame, dict[str, str]]:
    """Group A: 100 distinct images, one removed. Group B: 97 distinct images plus 3 images with
    30 copies each (187 samples, 100 images); the 3 duplicated images are removed, every copy.

    By images: A 1/100, B 3/100 removed. By samples: A 1/100, B 90/187.
    """
    rows, image_of = [], {}
    for i in range(100):
        rows.append({"sample_id": f"a{i}", "skin": "A", "removed": i == 0})
    for i in range(97):
        rows.append({"sample_id": f"b{i}", "skin": "B", "removed": False})
    for d in range(3):
        for c in range(30):
            sid = f"dup{d}-{c}"
            rows.append({"sample_id": sid, "skin": "B", "removed": True})
            image_of[sid] = f"sha{d}"
    return pd.DataFrame(rows), image_of


def test_image_frame_counts_each_duplicate_group_once():
    frame, image_of = planted()
    images, conflicting, partial = image_frame(frame, ["skin"], image_of)
    assert len(frame) == 287 and len(images) == 200
    counts = images.groupby("skin")["removed"].agg(["size", "sum"])
    assert counts.loc["A"].tolist() == [100, 1] and counts.loc["B"].tolist() == [100, 3]
    assert conflicting == 0 and partial == 0


def test_distinct_images_vs_samples_hand_computed():
    frame, image_of = planted()
    res = audit_by_unit(frame, ["skin"], image_of)
    assert res.unit == "images" and res.other_unit == "samples"
    assert (res.n_images, res.n_samples) == (200, 287)
    by_img = {g.group: g for g in res.result.attributes[0].groups}
    by_smp = {g.group: g for g in res.other.attributes[0].groups}
    assert (by_img["B"].n, by_img["B"].n_removed) == (100, 3)
    assert (by_smp["B"].n, by_smp["B"].n_removed) == (187, 90)
    a_img = res.result.attributes[0]
    # images: retention 0.97 / 0.99; Fisher (expected removed counts 2 < 5) on [[99,1],[97,3]].
    assert a_img.retention_ratio == pytest.approx(0.97 / 0.99)
    assert a_img.test == "fisher"
    assert a_img.p_value == pytest.approx(stats.fisher_exact([[99, 1], [97, 3]]).pvalue)
    assert res.result.passed
    # samples: retention (97/187) / 0.99 = 0.524 < 0.8: the copies fail the four-fifths rule.
    a_smp = res.other.attributes[0]
    assert a_smp.retention_ratio == pytest.approx((97 / 187) / 0.99)
    assert a_smp.ratio_violation and not res.other.passed
    assert res.disagree == ["skin"]
    (why,) = res.comparisons
    assert (why.group, why.removed_images, why.removed_samples) == ("B", 3, 90)
    assert why.rate_images == pytest.approx(0.03) and why.rate_samples == pytest.approx(90 / 187)
    assert "30.0 copies each" in why.explanation


def test_samples_unit_decides_when_chosen():
    frame, image_of = planted()
    res = audit_by_unit(frame, ["skin"], image_of, unit="samples")
    assert res.unit == "samples" and not res.result.passed and res.other.passed


def test_units_agree_without_duplicates():
    frame, _ = planted()
    res = audit_by_unit(frame, ["skin"], {})
    assert res.n_images == res.n_samples == 287
    assert res.disagree == [] and res.comparisons == []


def test_conflicting_values_take_the_majority_and_partial_removals_count_as_removed():
    frame = pd.DataFrame({
        "sample_id": ["x1", "x2", "x3", "y1", "y2"],
        "tone": ["dark", "dark", "light", "light", None],
        "removed": [True, False, False, False, False],
    })  # fmt: skip
    image_of = {"x1": "X", "x2": "X", "x3": "X", "y1": "Y", "y2": "Y"}
    images, conflicting, partial = image_frame(frame, ["tone"], image_of)
    got = images.set_index("image")
    # X: dark 2 vs light 1 -> dark; removed (one copy of three). Y: light 1 vs unknown 1 ->
    # tie broken by the smaller label, 'light'.
    assert got.loc["X", "tone"] == "dark" and bool(got.loc["X", "removed"])
    assert got.loc["Y", "tone"] == "light" and not bool(got.loc["Y", "removed"])
    assert (conflicting, partial) == (2, 1)
