"""Ingest tasks. No maths and no SQL here: each wraps a function from ``diffcurate.ingest``.

Caching is off (``NO_CACHE``): inputs are image bytes, hashing them for a cache key would cost
as much as the work, and writes are already idempotent. Writes retry because object stores
have transient failures; a retried write inserts nothing twice (merge on primary key).
"""

from __future__ import annotations

import os
import socket

from prefect import task
from prefect.cache_policies import NO_CACHE

from diffcurate.ingest.decode import DecodeResult, decode_many
from diffcurate.ingest.dedup import DuplicateGroups
from diffcurate.ingest.duplicates import write_duplicate_groups
from diffcurate.ingest.shard import ShardResult, prepare_shard
from diffcurate.storage.lance_store import LanceStore

prepare_shard_task = task(prepare_shard, name="prepare-shard", cache_policy=NO_CACHE)


@task(name="decode-images", cache_policy=NO_CACHE)
def decode_images(
    images: list[bytes | None], max_pixels: int
) -> tuple[str, list[DecodeResult | None]]:
    """Decode and hash one shard's images on a (Dask) worker; returns (worker, results)."""
    return f"{socket.gethostname()}:{os.getpid()}", decode_many(images, max_pixels)


@task(name="write-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_shard(store: LanceStore, result: ShardResult) -> tuple[int, int]:
    """Commit a prepared shard; returns (new sample rows, new quarantine rows)."""
    return (
        store.insert_new("samples", result.samples),
        store.insert_new("quarantine", result.quarantine),
    )


@task(name="dedup", cache_policy=NO_CACHE, retries=1)
def dedup(
    store: LanceStore, dataset: str, run_id: str, phash_max_distance: int, clip_threshold: float
) -> DuplicateGroups:
    """Recompute the dataset's duplicate groups over all its samples and store them."""
    return write_duplicate_groups(
        store, dataset, run_id, phash_max_distance=phash_max_distance, clip_threshold=clip_threshold
    )
