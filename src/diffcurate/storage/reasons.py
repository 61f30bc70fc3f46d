"""Quarantine reason codes: one stable string per way a row can be refused.

Reasons are part of the public data model (the ``quarantine`` table, run summaries, the ledger),
so they are an enum rather than free text; the human-readable explanation goes in ``detail``.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT_IMAGE = "corrupt_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"
    SIZE_OUT_OF_BOUNDS = "size_out_of_bounds"
    CAPTION_MISSING = "caption_missing"
    CAPTION_EMPTY = "caption_empty"
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    CAPTION_TOO_LONG = "caption_too_long"
    KEY_MISSING = "key_missing"
    METADATA_INVALID = "metadata_invalid"
    DUPLICATE_ID = "duplicate_id"
    KEY_CONFLICT = "key_conflict"
    UNSAFE_PATH = "unsafe_path"
    SHARD_CORRUPT = "shard_corrupt"
