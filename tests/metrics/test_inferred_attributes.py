"""Inferred attributes: zero-shot assignment against hand-computed cosines, the uncertain rule,
caption keyword groups and face-count buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from diffcurate.metrics.inferred_attributes import (
    MULTIPLE,
    UNCERTAIN,
    UNKNOWN,
    CaptionAttribute,
    ZeroShotAttribute,
    ZeroShotRule,
    assign_zero_shot,
    caption_groups,
    face_count_group,
    group_text_embeddings,
)


def test_zero_shot_matches_hand_computed_cosines_and_softmax():
    # image 0 = (3, 4)/5: cosines 0.6 with "man" = e1 and 0.8 with "woman" = e2.
    # image 1 = (1, 0): cosines 1 and 0. image 2 = (1, 1)/sqrt 2: 0.7071 each.
    images = np.array([[3.0, 4.0], [2.0, 0.0], [1.0, 1.0]])
    groups = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = assign_zero_shot(
        images, groups, ["man", "woman"], ZeroShotRule(threshold=0.6, logit_scale=10.0)
    )
    np.testing.assert_allclose(out.cosines, [[0.6, 0.8], [1.0, 0.0], [0.5**0.5, 0.5**0.5]])
    # softmax(10 * cos): image 0 -> 1 / (1 + e^-2) = 0.8808 for "woman";
    # image 1 -> 1 / (1 + e^-10); image 2 -> a tie at 0.5 < 0.6: uncertain.
    np.testing.assert_allclose(
        out.confidence, [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-10)), 0.5], rtol=1e-12
    )
    assert out.labels == ["woman", "man", UNCERTAIN]
    assert out.groups == ["man", "woman"]


def test_uncertain_threshold_is_inclusive_and_scale_matters():
    images = np.array([[3.0, 4.0]])
    groups = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = 1 / (1 + math.exp(-2))  # 0.8808 at scale 10
    at = assign_zero_shot(
        images, groups, ["a", "b"], ZeroShotRule(threshold=p - 1e-12, logit_scale=10.0)
    )
    above = assign_zero_shot(
        images, groups, ["a", "b"], ZeroShotRule(threshold=0.89, logit_scale=10.0)
    )
    assert at.labels == ["b"] and above.labels == [UNCERTAIN]
    # CLIP's scale 100 makes the same cosines decisive: 1 / (1 + e^-20).
    sharp = assign_zero_shot(images, groups, ["a", "b"], ZeroShotRule(threshold=0.89))
    assert sharp.labels == ["b"]
    assert sharp.confidence[0] == pytest.approx(1 / (1 + math.exp(-20)))
    # threshold 0 assigns every image, even at a tie (first group wins the argmax).
    tie = assign_zero_shot(np.array([[1.0, 1.0]]), groups, ["a", "b"], ZeroShotRule(threshold=0))
    assert tie.labels == ["a"]


def test_prompt_ensemble_is_the_renormalised_mean():
    # group 0: prompts e1 and e2 -> mean (0.5, 0.5) -> (1, 1)/sqrt 2; group 1: (0, 3) -> e2.
    emb = group_text_embeddings([np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[0.0, 3.0]])])
    np.testing.assert_allclose(emb, [[0.5**0.5, 0.5**0.5], [0.0, 1.0]])


def test_zero_shot_shapes_are_checked():
    with pytest.raises(ValueError, match="do not match"):
        assign_zero_shot(np.ones((2, 3)), np.ones((2, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="2 group embeddings for 3 groups"):
        assign_zero_shot(np.ones((2, 2)), np.ones((2, 2)), ["a", "b", "c"])


def test_zero_shot_attribute_config_forms():
    listed = ZeroShotAttribute(groups=["a photo of a man", "a photo of a woman"])
    assert listed.groups == {
        "a photo of a man": ["a photo of a man"],
        "a photo of a woman": ["a photo of a woman"],
    }
    mapped = ZeroShotAttribute(groups={"man": "a photo of a man", "woman": ["a", "b"]})
    assert mapped.groups == {"man": ["a photo of a man"], "woman": ["a", "b"]}
    with pytest.raises(ValidationError):
        ZeroShotAttribute(groups=["only one"])
    with pytest.raises(ValidationError):
        ZeroShotAttribute(groups={"uncertain": "x", "b": "y"})


def test_caption_groups_whole_words_multiple_and_unknown():
    attr = CaptionAttribute(
        groups={
            "man": ["man", "men", "boy"],
            "woman": ["woman", "girl"],
            "elder": "re:\\b(old|elderly)\\s+(man|woman)\\b",
        }
    )
    captions = [
        "A MAN riding a horse",  # man (case-insensitive)
        "portrait of a woman",  # woman
        "a man and a woman dancing",  # multiple
        "a manor house in snow",  # no whole word: unknown
        "an elderly woman smiling",  # woman and elder: multiple
        "",  # unknown
        None,  # unknown
        "two boys",  # 'boy' is not a whole word in 'boys': unknown
    ]
    assert caption_groups(captions, attr) == [
        "man",
        "woman",
        MULTIPLE,
        UNKNOWN,
        MULTIPLE,
        UNKNOWN,
        UNKNOWN,
        UNKNOWN,
    ]
    phrase = CaptionAttribute(groups={"old": "old   man"})
    assert caption_groups(["an old man", "old manual"], phrase) == ["old", UNKNOWN]
    with pytest.raises(ValidationError):
        CaptionAttribute(groups={"bad": "re:("})


def test_face_count_group():
    assert [face_count_group(c) for c in (0, 1, 2, 7)] == ["0", "1", "2+", "2+"]
    with pytest.raises(ValueError):
        face_count_group(-1)
