"""Turn one shard of raw records into validated sample rows and quarantine rows.

A shard is the unit of work, retry and resume: it is prepared here in memory, then written with
one idempotent merge per table. Memory is bounded by the shard size, never the corpus size.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa

from diffcurate.config import IngestSettings
from diffcurate.ingest.decode import DecodedImage, DecodeFailure, decode_image, sha256_hex
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
    """
    now = datetime.now(UTC)
    quarantined: list[dict] = []
    candidates: list[_Candidate] = []
    claimed: dict[str, str] = {}
    already_present = 0

    def reject(rec: RawRecord, sid: str | None, reason: Reason, detail: str) -> None:
        quarantined.append(_quarantine_row(dataset, run_id, now, rec, sid, reason, detail))

    for rec in records:
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
        decoded = decode_image(rec.image, max_pixels=cfg.max_pixels)
        if isinstance(decoded, DecodeFailure):
            reject(rec, sid, decoded.reason, decoded.detail)
            continue
        claimed[sid] = decoded.sha256
        candidates.append(_Candidate(rec, sid, decoded))

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
        image_emb = embedder.embed_images([c.decoded.image for c in accepted])
        text_emb = embedder.embed_texts([c.record.caption or "" for c in accepted])

    samples = pa.Table.from_pylist(
        [
            {
                "sample_id": c.sample_id,
                "dataset": dataset,
                "key": c.record.key,
                "source": c.record.source,
                "image": c.record.image,
                "image_format": c.decoded.format,
                "width": c.decoded.width,
                "height": c.decoded.height,
                "sha256": c.decoded.sha256,
                "phash": c.decoded.phash,
                "caption": c.record.caption,
                "metadata": canonical_metadata(c.record.metadata),
                "embedding_model": embedder.name if embedder is not None else None,
                "image_embedding": None if image_emb is None else image_emb[i].tolist(),
                "text_embedding": None if text_emb is None else text_emb[i].tolist(),
                "ingest_run_id": run_id,
                "ingested_at": now,
            }
            for i, c in enumerate(accepted)
        ],
        schema=SAMPLES,
    )
    return ShardResult(
        samples=samples,
        quarantine=pa.Table.from_pylist(quarantined, schema=QUARANTINE),
        seen=len(records),
        already_present=already_present,
        claimed=claimed,
    )
