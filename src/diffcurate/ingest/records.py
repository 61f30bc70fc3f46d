"""The record a source reader yields, before any decoding or validation."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from diffcurate.storage.reasons import Reason


@dataclass(frozen=True)
class RawRecord:
    """One image–caption pair as found in a source, or the reason it could not be read.

    Readers never raise on bad rows: they yield a record with ``reason`` set so the row is
    quarantined and the rest of the source is still ingested.

    Attributes:
        key: Source-unique name of the sample (file stem, manifest key, tar member key).
        source: Where it came from, precise enough to find it again (``path#member``).
        image: Raw encoded image bytes, exactly as stored in the source.
        caption: Caption text, or ``None`` when the source has none.
        caption_raw: Caption bytes when they could not be decoded as UTF-8.
        metadata: Free-form columns kept with the sample (license, group attributes, ...).
        reason: Set when the reader already knows the row is bad.
        detail: Human-readable explanation for ``reason``.
    """

    key: str
    source: str
    image: bytes | None = None
    caption: str | None = None
    caption_raw: bytes | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    reason: Reason | None = None
    detail: str = ""


def sample_id_for(dataset: str, key: str) -> str:
    """Stable sample id: the same (dataset, key) always maps to the same id, in any format.

    Ids derive from the key rather than the content so that exact duplicates (a memorization
    signal) stay separate samples, and from the dataset so that datasets never collide.
    """
    return hashlib.sha256(f"{dataset}\x00{key}".encode()).hexdigest()[:24]


def decode_caption(data: bytes) -> tuple[str | None, Reason | None, str]:
    """Decode sidecar caption bytes strictly as UTF-8 (a BOM is tolerated)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, Reason.CAPTION_NOT_UTF8, f"caption is not valid UTF-8: {err}"
    return text, None, ""


def canonical_metadata(metadata: dict[str, Any]) -> str:
    """Canonical JSON (sorted keys, no NaN) so that equal content compares equal.

    Top-level nulls are dropped: a parquet manifest can only express "this sample has no such
    field" as a null in a column other samples fill, while a JSON sidecar omits the key. Both
    mean the same, so both serialise the same.
    """

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (bytes, bytearray)):
            return value.hex()
        return value

    present = {k: v for k, v in metadata.items() if clean(v) is not None}
    return json.dumps(clean(present), sort_keys=True, ensure_ascii=False, default=str)
