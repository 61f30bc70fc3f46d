"""Arrow schemas of the LanceDB tables. Changing a schema is a data migration: add, never rename."""

from __future__ import annotations

import re
from typing import Annotated

import pyarrow as pa
from pydantic import AfterValidator

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_dataset_name(name: str) -> str:
    """Dataset names end up in file names and filter expressions; keep them boring."""
    if not _DATASET_NAME.match(name):
        raise ValueError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


DatasetName = Annotated[str, AfterValidator(validate_dataset_name)]
"""A dataset name, validated wherever it is a pydantic field (flow parameters, configs)."""


_TS = pa.timestamp("us", tz="UTC")

SAMPLES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image", pa.large_binary(), nullable=False),
        pa.field("image_format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("phash", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # canonical JSON object
        # Embeddings are variable-length lists so one table can hold datasets embedded with
        # different CLIP models (or none); `embedding_model` says which produced them.
        pa.field("embedding_model", pa.string()),
        pa.field("image_embedding", pa.list_(pa.float32())),
        pa.field("text_embedding", pa.list_(pa.float32())),
        pa.field("ingest_run_id", pa.string(), nullable=False),
        pa.field("ingested_at", _TS, nullable=False),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("quarantine_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("sample_id", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        # What was read is kept so nothing is lost: the user can fix and re-ingest.
        pa.field("image", pa.large_binary()),
        pa.field("caption", pa.string()),
        pa.field("caption_raw", pa.binary()),
        pa.field("metadata", pa.string()),
        pa.field("ingest_run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", _TS, nullable=False),
    ]
)

DUPLICATES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("exact_group", pa.string(), nullable=False),  # sha256 of the bytes
        pa.field("exact_group_size", pa.int32(), nullable=False),
        pa.field("near_group", pa.string(), nullable=False),  # smallest sample_id in component
        pa.field("near_group_size", pa.int32(), nullable=False),
        pa.field("near_method", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


SCORES = pa.schema(
    [
        pa.field("score_id", pa.string(), nullable=False),  # f"{run_id}/{sample_id}"
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # high = risky, for every signal
        pa.field("stderr", pa.float64()),
        # Parts; their names (layers, timesteps) are recorded once per run in the ledger.
        pa.field("per_layer", pa.list_(pa.float64())),
        pa.field("per_timestep", pa.list_(pa.float64())),
        pa.field("method", pa.string(), nullable=False),
        pa.field("scored_at", _TS, nullable=False),
    ]
)

# VAE latents of samples, cached per (sample, cache key); the key hashes the VAE's weights and
# config, the pixel size, the geometry policy and the encoding dtype (storage/latent_cache.py).
LATENTS = pa.schema(
    [
        pa.field("latent_id", pa.string(), nullable=False),  # f"{cache_key}/{sample_id}"
        pa.field("cache_key", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("latent", pa.large_binary(), nullable=False),  # little-endian float32, C order
        pa.field("created_at", _TS, nullable=False),
    ]
)

# Group attributes inferred per sample (CLIP zero-shot, caption keywords, face counts), one row
# per (attribute, sample), with what inferred them: the fairness audit of corpora without
# demographic metadata (storage/attributes.py).
INFERRED_ATTRIBUTES = pa.schema(
    [
        pa.field("attribute_id", pa.string(), nullable=False),  # f"{attribute}/{sample_id}"
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),  # the group label
        pa.field("confidence", pa.float64()),  # zero-shot: best-group probability
        pa.field("source", pa.string(), nullable=False),  # zero-shot | caption | faces
        pa.field("model", pa.string(), nullable=False),  # what produced the value
        pa.field("fingerprint", pa.string(), nullable=False),  # weights + settings digest
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("computed_at", _TS, nullable=False),
    ]
)

TABLES: dict[str, tuple[pa.Schema, str]] = {
    "samples": (SAMPLES, "sample_id"),
    "quarantine": (QUARANTINE, "quarantine_id"),
    "duplicates": (DUPLICATES, "sample_id"),
    "scores": (SCORES, "score_id"),
    "latents": (LATENTS, "latent_id"),
    "inferred_attributes": (INFERRED_ATTRIBUTES, "attribute_id"),
}
