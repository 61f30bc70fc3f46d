"""Turn one shard of raw records into validated sample rows and quarantine rows.

A shard is the unit of work, retry and resume: it is prepared here in memory, then written with
one idempotent merge per table. Memory is bounded by the shard size, never the corpus size.

Decoding and hashing (the costly, order-free part) may run elsewhere, a worker process or a Dask
task, on the images :func:`images_to_decode` picks; everything that depends on source order
(the first decodable record of a key claims it) happens here, in the flow's process, so the rows
are the same whoever decoded.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
from PIL import Image

from diffcurate.config import IngestSettings
from diffcurate.ingest.decode import (
    DecodedImage,
    DecodeFailure,
    DecodeResult,
    decode_image,
    sha256_hex,
)
from diffcurate.ingest.records import RawRecord, canonical_metadata, sample_id_for
from diffcurate.models.clip_embedder import ClipEmbedder
from diffcurate.storage.reasons import Reason
from diffcurate.storage.schemas import QUARANTINE, SAMPLES
from diffcurate.storage.validation import SampleBatchValidator


@dataclass
class ShardResult:
    """What one shard produced. Rows are not written yet: the caller commits them."""

    samples: pa.Table
    quarantine: pa.Table
    seen: int
    already_present: int
    claimed: dict[str, str] = field(default_factory=dict)  # sample_id -> sha256

    @property
    def reasons(self) -> Counter[str]:
        return Counter(self.quarantine.column("reason").to_pylist())


@dataclass
class _Candidate:
    record: RawRecord
    sample_id: str
    decoded: DecodedImage


def quarantine_id_for(dataset: str, key: str, source: str, reason: str) -> str:
    return hashlib.sha256(f"{dataset}\x00{key}\x00{source}\x00{reason}".encode()).hexdigest()[:24]


def _quarantine_row(
    dataset: str,
    run_id: str,
    now: datetime,
    rec: RawRecord,
    sid: str | None,
    reason: Reason,
    detail: str,
) -> dict:
    return {
        "quarantine_id": quarantine_id_for(dataset, rec.key, rec.source, reason.value),
        "dataset": dataset,
        "key": rec.key,
        "sample_id": sid,
        "source": rec.source,
        "reason": reason.value,
        "detail": detail,
        "image": rec.image,
        "caption": rec.caption,
        "caption_raw": rec.caption_raw,
        "metadata": canonical_metadata(rec.metadata),
        "ingest_run_id": run_id,
        "quarantined_at": now,
    }


def images_to_decode(
    records: Sequence[RawRecord], dataset: str, known: dict[str, str]
) -> list[bytes | None]:
    """The image bytes of the records :func:`prepare_shard` will decode (``None`` elsewhere):
    readable records whose key is not stored yet."""
    return [
        rec.image
        if rec.reason is None
        and rec.image is not None
        and sample_id_for(dataset, rec.key) not in known
        else None
        for rec in records
    ]


def _pixels(c: _Candidate) -> Image.Image:
    if c.decoded.image is not None:
        return c.decoded.image
    assert c.record.image is not None
    return Image.open(io.BytesIO(c.record.image)).convert("RGB")


def prepare_shard(
    records: Sequence[RawRecord],
    *,
    dataset: str,
    run_id: str,
    known: dict[str, str],
    claimed_this_run: set[str],
    cfg: IngestSettings,
    validator: SampleBatchValidator,
    embedder: ClipEmbedder | None,
    decoded: Sequence[DecodeResult | None] | None = None,
) -> ShardResult:
    """Decode, validate and embed one shard.

    Args:
        records: Raw records in source order.
        dataset: Dataset name (part of every sample id).
        run_id: The ingest run writing these rows.
        known: ``sample_id -> sha256`` of samples already stored by earlier runs.
        claimed_this_run: Sample ids this run has already accepted in earlier shards; the first
            decodable record of a key claims it, later ones are duplicate ids.
        cfg: Validation bounds.
        validator: The great-expectations suite runner.
        embedder: CLIP embedder, or ``None`` when embeddings are disabled.
        decoded: Decode results of :func:`images_to_decode` computed elsewhere (aligned with
            ``records``); ``None`` decodes here.
    """
    now = datetime.now(UTC)
    quarantined: list[dict] = []
    candidates: list[_Candidate] = []
    claimed: dict[str, str] = {}
    already_present = 0

    def reject(rec: RawRecord, sid: str | None, reason: Reason, detail: str) -> None:
        quarantined.append(_quarantine_row(dataset, run_id, now, rec, sid, reason, detail))

    for position, rec in enumerate(records):
        sid = sample_id_for(dataset, rec.key)
        if rec.reason is not None:
            reject(rec, sid, rec.reason, rec.detail)
            continue
        assert rec.image is not None  # readers set a reason whenever the image is missing
        if sid in claimed_this_run or sid in claimed:
            reject(rec, sid, Reason.DUPLICATE_ID, f"key {rec.key!r} already seen in this source")
            continue
        if sid in known:
            if known[sid] == sha256_hex(rec.image):
                already_present += 1
            else:
                reject(
                    rec,
                    sid,
                    Reason.KEY_CONFLICT,
                    f"key {rec.key!r} is already stored with different image bytes; samples are "
                    "never overwritten: give changed content a new key",
                )
            continue
        result = (
            decode_image(rec.image, max_pixels=cfg.max_pixels)
            if decoded is None
            else decoded[position]
        )
        assert result is not None  # images_to_decode picks exactly these records
        if isinstance(result, DecodeFailure):
            reject(rec, sid, result.reason, result.detail)
            continue
        claimed[sid] = result.sha256
        candidates.append(_Candidate(rec, sid, result))

    frame = pd.DataFrame(
        {
            "sample_id": [c.sample_id for c in candidates],
            "caption": [c.record.caption for c in candidates],
            "width": [c.decoded.width for c in candidates],
            "height": [c.decoded.height for c in candidates],
            "sha256": [c.decoded.sha256 for c in candidates],
        }
    )
    failed: dict[int, list] = {}
    for failure in validator.validate(frame):
        failed.setdefault(failure.row, []).append(failure)
    for row, failures in sorted(failed.items()):
        c = candidates[row]
        detail = "; ".join(f.detail for f in failures)
        reject(c.record, c.sample_id, failures[0].reason, detail)
    accepted = [c for i, c in enumerate(candidates) if i not in failed]

    image_emb = text_emb = None
    if embedder is not None and accepted:
        image_emb = embedder.embed_images([_pixels(c) for c in accepted])
        text_emb = embedder.embed_texts([c.record.caption or "" for c in accepted])

    n = len(accepted)

    def embeddings(values) -> pa.Array:
        if values is None:
            return pa.nulls(n, SAMPLES.field("image_embedding").type)
        return pa.array(values.tolist(), SAMPLES.field("image_embedding").type)

    columns = {
        "sample_id": [c.sample_id for c in accepted],
        "dataset": [dataset] * n,
        "key": [c.record.key for c in accepted],
        "source": [c.record.source for c in accepted],
        "image": [c.record.image for c in accepted],
        "image_format": [c.decoded.format for c in accepted],
        "width": [c.decoded.width for c in accepted],
        "height": [c.decoded.height for c in accepted],
        "sha256": [c.decoded.sha256 for c in accepted],
        "phash": [c.decoded.phash for c in accepted],
        "caption": [c.record.caption for c in accepted],
        "metadata": [canonical_metadata(c.record.metadata) for c in accepted],
        "embedding_model": [embedder.name if embedder is not None else None] * n,
        "image_embedding": embeddings(image_emb),
        "text_embedding": embeddings(text_emb),
        "ingest_run_id": [run_id] * n,
        "ingested_at": [now] * n,
    }
    samples = pa.table(
        [c if isinstance(c, pa.Array) else pa.array(c, f.type)
         for f, c in ((f, columns[f.name]) for f in SAMPLES)],
        schema=SAMPLES,
    )  # fmt: skip
    return ShardResult(
        samples=samples,
        quarantine=pa.Table.from_pylist(quarantined, schema=QUARANTINE),
        seen=len(records),
        already_present=already_present,
        claimed=claimed,
    )
