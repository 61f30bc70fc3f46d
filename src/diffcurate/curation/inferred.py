"""Compute inferred group attributes for a dataset, and for generated images.

``diffcurate audit-attributes`` calls :func:`infer_dataset`: it labels every sample of a
dataset with the configured caption attributes (no model), CLIP zero-shot attributes (the
ingest checkpoint; the image embeddings ingest stored are reused when this checkpoint made
them) and the face count (the bundled detector), and stores the labels with what produced them.
The hygiene run audits them like metadata columns, and labels the generations of the original
and the candidate model with :class:`ImageLabeller`, the same zero-shot prompts and detector.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from diffcurate.config import AttributeSettings, ClipSettings
from diffcurate.curation.zero_shot import ZeroShotClassifier, zero_shot_attributes
from diffcurate.digests import content_digest
from diffcurate.metrics.inferred_attributes import (
    CaptionAttribute,
    ZeroShotRule,
    caption_groups,
    face_count_group,
)
from diffcurate.models.faces import FaceDetector, FaceDetectorUnavailableError, load_face_detector
from diffcurate.storage.attributes import write_attribute
from diffcurate.storage.lance_store import LanceStore

FACES = "faces"
"""Name of the face-count attribute."""
CAPTION_MODEL = "caption-keywords"
"""Model name recorded for caption-derived attributes."""
IMAGE_CHUNK = 512
"""Images decoded at a time (memory stays bounded by a chunk, not the corpus)."""


class InferredAttribute(BaseModel):
    """What was computed for one attribute.

    Attributes:
        attribute: Name.
        source: ``zero-shot``, ``caption`` or ``faces``.
        model: What produced the labels.
        fingerprint: Digest of the weights and settings.
        n_samples: Samples labelled.
        written: Rows written (0: already stored under this fingerprint).
        counts: Samples per label.
    """

    model_config = ConfigDict(frozen=True)

    attribute: str
    source: str
    model: str
    fingerprint: str
    n_samples: int
    written: int
    counts: dict[str, int]


class InferReport(BaseModel):
    """The result of :func:`infer_dataset`.

    Attributes:
        dataset: The dataset.
        attributes: One entry per computed attribute.
        skipped: Sources not computed, with why.
    """

    dataset: str
    attributes: list[InferredAttribute]
    skipped: list[str]


def rule_of(settings: AttributeSettings) -> ZeroShotRule:
    """The zero-shot assignment rule of the settings."""
    return ZeroShotRule(threshold=settings.threshold, logit_scale=settings.logit_scale)


def caption_attributes(settings: AttributeSettings) -> dict[str, CaptionAttribute]:
    """The configured caption attributes, validated."""
    return {name: CaptionAttribute(groups=g) for name, g in settings.captions.items()}


def _counts(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _decode(blobs: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


def infer_dataset(
    store: LanceStore,
    dataset: str,
    settings: AttributeSettings,
    clip: ClipSettings,
    run_id: str,
    *,
    classifier: ZeroShotClassifier | None = None,
    detector: FaceDetector | None = None,
    progress: Callable[[str], None] | None = None,
) -> InferReport:
    """Label every sample of ``dataset`` and store the labels (see the module docstring).

    Args:
        store: The workspace's tables.
        dataset: An ingested dataset.
        settings: Which attributes to infer.
        clip: The CLIP checkpoint for zero-shot attributes.
        run_id: Recorded with the rows.
        classifier: A loaded zero-shot classifier (default: built from the settings).
        detector: A face detector (default: the bundled one).
        progress: Called with one line per attribute.

    Raises:
        ValueError: Unknown dataset, or zero-shot attributes without a CLIP checkpoint.
    """
    say = progress or (lambda _: None)
    meta = store.read("samples", dataset,
                      columns=["sample_id", "caption", "embedding_model"]).to_pylist()  # fmt: skip
    if not meta:
        raise ValueError(f"dataset {dataset!r} has no samples")
    ids = [r["sample_id"] for r in meta]
    done: list[InferredAttribute] = []
    skipped: list[str] = []

    def store_one(name: str, values, conf, source: str, model: str, fp: str) -> None:
        written = write_attribute(store, dataset, name, sample_ids=ids, values=values,
                                  confidence=conf, source=source, model=model, fingerprint=fp,
                                  run_id=run_id)  # fmt: skip
        item = InferredAttribute(attribute=name, source=source, model=model, fingerprint=fp,
                                 n_samples=len(ids), written=written,
                                 counts=_counts(values))  # fmt: skip
        done.append(item)
        say(f"{name}: {source} by {model}, {item.counts}")

    captions = [r["caption"] for r in meta]
    for name, attr in caption_attributes(settings).items():
        fp = content_digest("caption", attr.model_dump(mode="json"))
        store_one(name, caption_groups(captions, attr), None, "caption", CAPTION_MODEL, fp)

    zero_shot = zero_shot_attributes(settings)
    if zero_shot:
        if not clip.enabled:
            raise ValueError("zero-shot attributes need a CLIP checkpoint (clip.checkpoint)")
        classifier = classifier or ZeroShotClassifier(clip, zero_shot, rule_of(settings))
        embeddings = _image_embeddings(store, dataset, ids, meta, classifier)
        for name, labels in classifier.label_embeddings(embeddings).items():
            store_one(name, labels.labels, labels.confidence, "zero-shot", classifier.model,
                      classifier.fingerprint(name))  # fmt: skip

    if settings.faces:
        try:
            detector = detector or load_face_detector()
        except FaceDetectorUnavailableError as e:
            skipped.append(f"{FACES}: {e}")
        else:
            counts: list[int] = []
            for start in range(0, len(ids), IMAGE_CHUNK):
                chunk = ids[start : start + IMAGE_CHUNK]
                counts += detector.count(_decode(_images(store, dataset, chunk)))
            store_one(FACES, [face_count_group(c) for c in counts], None, "faces",
                      detector.name, detector.fingerprint)  # fmt: skip
    return InferReport(dataset=dataset, attributes=done, skipped=skipped)


def _images(store: LanceStore, dataset: str, ids: Sequence[str]) -> list[bytes]:
    """Image bytes of ``ids``, in that order."""
    rows = store.read("samples", dataset, columns=["sample_id", "image"],
                      where={"sample_id": list(ids)})  # fmt: skip
    by_id = dict(zip(rows.column("sample_id").to_pylist(), rows.column("image").to_pylist(),
                     strict=True))  # fmt: skip
    return [by_id[i] for i in ids]


def _image_embeddings(
    store: LanceStore,
    dataset: str,
    ids: list[str],
    meta: list[dict],
    classifier: ZeroShotClassifier,
) -> np.ndarray:
    """The samples' CLIP image embeddings: ingest's when this checkpoint made them all."""
    if all(r["embedding_model"] == classifier.model for r in meta):
        rows = store.read("samples", dataset, columns=["sample_id", "image_embedding"])
        by_id = dict(zip(rows.column("sample_id").to_pylist(),
                         rows.column("image_embedding").to_pylist(), strict=True))  # fmt: skip
        if all(by_id.get(i) is not None for i in ids):
            return np.asarray([by_id[i] for i in ids], dtype=np.float32)
    parts = []
    for start in range(0, len(ids), IMAGE_CHUNK):
        chunk = ids[start : start + IMAGE_CHUNK]
        parts.append(classifier.embedder.embed_images(_decode(_images(store, dataset, chunk))))
    return np.concatenate(parts)


@dataclass
class ImageLabeller:
    """Labels images (generations) with the image-based inferred attributes.

    Attributes:
        classifier: Zero-shot classifier, or None when no zero-shot attribute is configured.
        detector: Face detector, or None.
        skipped: Sources not available, with why.
    """

    classifier: ZeroShotClassifier | None
    detector: FaceDetector | None
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(
        cls,
        settings: AttributeSettings,
        clip: ClipSettings | None,
        *,
        classifier: ZeroShotClassifier | None = None,
        detector: FaceDetector | None = None,
    ) -> ImageLabeller:
        """The labeller the settings describe; sources that cannot load are skipped, with why."""
        skipped = []
        zero_shot = zero_shot_attributes(settings)
        if classifier is None and zero_shot:
            if clip is None or not clip.enabled:
                skipped.append("zero-shot: no CLIP checkpoint configured")
            else:
                classifier = ZeroShotClassifier(clip, zero_shot, rule_of(settings))
        if detector is None and settings.faces:
            try:
                detector = load_face_detector()
            except FaceDetectorUnavailableError as e:
                skipped.append(f"{FACES}: {e}")
        return cls(classifier=classifier, detector=detector, skipped=skipped)

    @property
    def available(self) -> bool:
        """Whether any image-based attribute can be inferred."""
        return self.classifier is not None or self.detector is not None

    def provenance(self) -> dict[str, str]:
        """Attribute → what infers it, for reports."""
        out = {}
        if self.classifier is not None:
            for name in self.classifier.attributes:
                fp = self.classifier.fingerprint(name)[:12]
                out[name] = f"inferred (zero-shot) by {self.classifier.model} [{fp}]"
        if self.detector is not None:
            fp = self.detector.fingerprint[:12]
            out[FACES] = f"inferred (faces) by {self.detector.name} [{fp}]"
        return out

    def label(self, images: Sequence[Image.Image]) -> dict[str, list[str]]:
        """Attribute → one label per image."""
        out: dict[str, list[str]] = {}
        if self.classifier is not None:
            for name, labels in self.classifier.label_images(images).items():
                out[name] = labels.labels
        if self.detector is not None:
            out[FACES] = [face_count_group(c) for c in self.detector.count(images)]
        return out
