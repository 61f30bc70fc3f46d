"""Group attributes inferred from the data itself, for corpora without demographic metadata.

LAION-style image–caption corpora carry no demographic columns, so an audit that only reads
metadata has nothing to audit there. This module holds the pure rules that turn model outputs
and captions into group labels; the models that produce the inputs live in
:mod:`diffcurate.models.zero_shot` and :mod:`diffcurate.models.faces`.

Three sources:

* **zero-shot** (CLIP): each group of an attribute is described by one or more prompts
  (``"a photo of a man"``); an image gets the group whose prompts' mean text embedding is most
  similar to it. Similarities become probabilities with CLIP's own recipe, a softmax over
  ``logit_scale * cosine`` (CLIP's learned scale is 100), and an image whose best probability
  is below ``threshold`` is labelled ``"uncertain"`` rather than forced into a group: zero-shot
  labels are guesses, and a guess at 52% should not count as a member of a group.
* **captions**: keyword or regex groups over the caption, no model needed. A caption matching
  exactly one group gets it, several groups give ``"multiple"``, none gives ``"unknown"``
  (the audit's missing-value group): a caption that says nothing is not evidence of a group.
* **faces**: a face count from a detector, bucketed as ``"0"``, ``"1"``, ``"2+"``.

Every label is a perception by a model or a rule, never a fact about a person: reports call
these attributes *inferred* and name what inferred them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

UNCERTAIN = "uncertain"
"""Zero-shot label of an image whose best group probability is below the threshold."""
MULTIPLE = "multiple"
"""Caption label when the caption matches keywords of more than one group."""
UNKNOWN = "unknown"
"""Caption label when no group matches (the audit's missing-value group)."""
NO_LABEL_GROUPS = frozenset({UNCERTAIN, MULTIPLE, UNKNOWN})
"""Labels that say "no group was inferred" rather than naming one."""


class ZeroShotAttribute(BaseModel):
    """One attribute inferred by CLIP zero-shot classification.

    Attributes:
        groups: Group label → prompts describing it. Several prompts per group are averaged
            (prompt ensembling, as in CLIP's paper), which makes the label less sensitive to
            one phrasing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    groups: dict[str, list[str]]

    @field_validator("groups", mode="before")
    @classmethod
    def _from_list(cls, value: object) -> object:
        """A plain list of prompts names each group by its prompt."""
        if isinstance(value, list | tuple):
            return {str(p): [str(p)] for p in value}
        if isinstance(value, Mapping):
            return {k: [v] if isinstance(v, str) else list(v) for k, v in value.items()}
        return value

    @field_validator("groups")
    @classmethod
    def _two_groups(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(value) < 2:
            raise ValueError("a zero-shot attribute needs at least two groups")
        if any(not prompts for prompts in value.values()):
            raise ValueError("every zero-shot group needs at least one prompt")
        bad = sorted(set(value) & NO_LABEL_GROUPS)
        if bad:
            raise ValueError(f"group labels {bad} are reserved")
        return value


class CaptionAttribute(BaseModel):
    """One attribute inferred from captions by keyword or regex groups.

    Attributes:
        groups: Group label → patterns. A pattern is a keyword or phrase matched as whole
            words, case-insensitively (``"man"`` matches "a man" but not "woman" or "manor"),
            or a regular expression when prefixed with ``re:`` (also case-insensitive).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    groups: dict[str, list[str]]

    @field_validator("groups", mode="before")
    @classmethod
    def _one_pattern(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {k: [v] if isinstance(v, str) else list(v) for k, v in value.items()}
        return value

    @field_validator("groups")
    @classmethod
    def _valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("a caption attribute needs at least one group")
        bad = sorted(set(value) & NO_LABEL_GROUPS)
        if bad:
            raise ValueError(f"group labels {bad} are reserved")
        for patterns in value.values():
            for p in patterns:
                try:
                    caption_pattern(p)
                except re.error as e:
                    raise ValueError(f"invalid caption pattern {p!r}: {e}") from e
        return value


class ZeroShotLabels(BaseModel):
    """Zero-shot labels of ``n`` images for one attribute.

    Attributes:
        labels: The group of each image, or ``"uncertain"``.
        confidence: The best group's softmax probability per image.
        cosines: ``[n, groups]`` cosine of each image to each group's text embedding.
        groups: Group order of ``cosines``' columns.
    """

    model_config = ConfigDict(frozen=True)

    labels: list[str]
    confidence: list[float]
    cosines: list[list[float]]
    groups: list[str]


class ZeroShotRule(BaseModel):
    """How cosines become labels.

    Attributes:
        threshold: Smallest best-group probability that assigns the group; below it the image
            is ``"uncertain"``. 0 assigns every image to its most similar group.
        logit_scale: Multiplies cosines before the softmax. CLIP's learned temperature is 100;
            a smaller scale spreads the probabilities and makes ``uncertain`` more common.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(0.6, ge=0.0, lt=1.0)
    logit_scale: float = Field(100.0, gt=0.0)


def group_text_embeddings(prompt_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """One unit vector per group: the mean of its prompts' unit embeddings, renormalised.

    Args:
        prompt_embeddings: Per group, ``[k, d]`` embeddings of its ``k`` prompts.

    Returns:
        ``[groups, d]`` unit rows.
    """
    rows = []
    for emb in prompt_embeddings:
        e = np.asarray(emb, dtype=np.float64).reshape(-1, np.shape(emb)[-1])
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        mean = e.mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def assign_zero_shot(
    image_embeddings: np.ndarray,
    group_embeddings: np.ndarray,
    groups: Sequence[str],
    rule: ZeroShotRule | None = None,
) -> ZeroShotLabels:
    """Label images by their most similar group, ``uncertain`` below the threshold.

    Args:
        image_embeddings: ``[n, d]`` image embeddings (normalised here).
        group_embeddings: ``[g, d]`` one text embedding per group (normalised here).
        groups: The ``g`` group labels.
        rule: Threshold and logit scale.

    Returns:
        Labels, best-group probabilities and the cosines.

    Raises:
        ValueError: Shapes that do not match.
    """
    rule = rule or ZeroShotRule()
    img = np.asarray(image_embeddings, dtype=np.float64)
    txt = np.asarray(group_embeddings, dtype=np.float64)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings of shapes {img.shape} and {txt.shape} do not match")
    if txt.shape[0] != len(groups):
        raise ValueError(f"{txt.shape[0]} group embeddings for {len(groups)} groups")
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    cos = img @ txt.T
    logits = rule.logit_scale * cos
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    best = prob.argmax(axis=1)
    conf = prob[np.arange(len(best)), best]
    labels = [
        str(groups[b]) if c >= rule.threshold else UNCERTAIN
        for b, c in zip(best, conf, strict=True)
    ]
    return ZeroShotLabels(
        labels=labels,
        confidence=conf.tolist(),
        cosines=cos.tolist(),
        groups=[str(g) for g in groups],
    )


def caption_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled regex of a caption pattern (see :class:`CaptionAttribute`)."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:], re.IGNORECASE)
    words = r"\s+".join(re.escape(w) for w in pattern.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def caption_groups(captions: Sequence[str | None], attribute: CaptionAttribute) -> list[str]:
    """The caption-derived group of each caption: one match, ``multiple`` or ``unknown``."""
    compiled = {g: [caption_pattern(p) for p in ps] for g, ps in attribute.groups.items()}
    out = []
    for caption in captions:
        text = caption or ""
        hits = [g for g, pats in compiled.items() if any(p.search(text) for p in pats)]
        out.append(hits[0] if len(hits) == 1 else MULTIPLE if hits else UNKNOWN)
    return out


def face_count_group(count: int) -> str:
    """Face-count bucket: ``"0"``, ``"1"`` or ``"2+"``."""
    if count < 0:
        raise ValueError(f"negative face count {count}")
    return "2+" if count >= 2 else str(count)
