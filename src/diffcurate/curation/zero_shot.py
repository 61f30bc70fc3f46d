"""CLIP zero-shot group labels, from the same local checkpoint ingest embeds with.

Training images are labelled from the image embeddings ingest stored (when they were made by
this checkpoint), so a corpus is never embedded twice; generated images are embedded here. Each
attribute's labels carry a fingerprint of the checkpoint file's bytes, the architecture, the
prompts and the assignment rule: labels stored under another fingerprint are never mixed with
these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from diffcurate.config import AttributeSettings, ClipSettings
from diffcurate.digests import content_digest
from diffcurate.metrics.inferred_attributes import (
    ZeroShotAttribute,
    ZeroShotLabels,
    ZeroShotRule,
    assign_zero_shot,
    group_text_embeddings,
)
from diffcurate.models.clip_embedder import ClipEmbedder


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def zero_shot_attributes(settings: AttributeSettings) -> dict[str, ZeroShotAttribute]:
    """The configured zero-shot attributes, validated."""
    return {name: ZeroShotAttribute(groups=groups) for name, groups in settings.zero_shot.items()}


class ZeroShotClassifier:
    """Labels images for every configured zero-shot attribute.

    Args:
        clip: The CLIP settings (local checkpoint; nothing is downloaded).
        attributes: Attribute name → its groups and prompts.
        rule: Threshold and logit scale of the assignment.
        embedder: An already loaded embedder for ``clip`` (tests, or to share one).
    """

    def __init__(
        self,
        clip: ClipSettings,
        attributes: Mapping[str, ZeroShotAttribute],
        rule: ZeroShotRule | None = None,
        embedder: ClipEmbedder | None = None,
    ) -> None:
        self.embedder = embedder or ClipEmbedder(clip)
        self.attributes = dict(attributes)
        self.rule = rule or ZeroShotRule()
        self.model = self.embedder.name
        weights = file_sha256(Path(clip.checkpoint)) if clip.checkpoint is not None else ""
        self._weights = weights
        self._texts: dict[str, tuple[list[str], np.ndarray]] = {}
        for name, attr in self.attributes.items():
            groups = list(attr.groups)
            per_group = [self.embedder.embed_texts(attr.groups[g]) for g in groups]
            self._texts[name] = (groups, group_text_embeddings(per_group))

    def fingerprint(self, attribute: str) -> str:
        """Digest of the weights, architecture, prompts and rule behind ``attribute``'s labels."""
        attr = self.attributes[attribute]
        return content_digest(self._weights, self.model, attr.model_dump(mode="json"),
                              self.rule.model_dump(mode="json"))  # fmt: skip

    def label_embeddings(self, image_embeddings: np.ndarray) -> dict[str, ZeroShotLabels]:
        """Labels of images given their CLIP embeddings (from this checkpoint)."""
        return {
            name: assign_zero_shot(image_embeddings, emb, groups, self.rule)
            for name, (groups, emb) in self._texts.items()
        }

    def label_images(self, images: Sequence[Image.Image]) -> dict[str, ZeroShotLabels]:
        """Embed RGB images with the checkpoint, then label them."""
        return self.label_embeddings(self.embedder.embed_images([i.convert("RGB") for i in images]))
