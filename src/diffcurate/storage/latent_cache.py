"""LanceDB ``latents`` table: VAE latents of samples, computed once and reused by every stage.

A row is one sample's latent under one *cache key* (primary key ``f"{cache_key}/{sample_id}"``).
The key is a hash of everything that determines the latent besides the image bytes, which
never change for a sample id (ingestion refuses to overwrite a sample):

* the VAE: :func:`vae_fingerprint`, a sha256 over its config (minus diffusers' ``_``-prefixed
  bookkeeping such as ``_name_or_path``, so the same VAE loaded from another path still hits)
  and its sorted state dict: names, shapes, dtypes and raw bytes. Any changed weight, buffer,
  ``scaling_factor`` or ``shift_factor`` gives another key;
* the pixel size and geometry policy the image was prepared with;
* the dtype the VAE encoded in;
* :data:`PREPARE_VERSION`, bumped whenever image preparation changes its output.

So a stale row is never read: it simply has another key. Rows are never updated; ``put`` merges
on the primary key (one atomic Lance commit), so re-putting stored latents adds nothing.
Latents are stored as little-endian float32 bytes with their shape. Latents encoded on another
device differ from a CPU encoding only by float round-off; whichever was stored first is what
every later reader gets, which keeps reruns bit-identical. Two writers racing on a new sample
can both insert it (see ``LanceStore.drop_duplicate_keys``); ``get`` then returns the first
copy in table order, so readers still agree.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from diffcurate.storage.schemas import LATENTS, validate_dataset_name

TABLE = "latents"
PREPARE_VERSION = 1
"""Version of the pixel preparation (``models/images.py``) that produced cached latents."""

_KEY = re.compile(r"^[0-9a-f]{64}$")
_IN_LIMIT = 1000  # above this many ids, filter by key in Lance and by id in Python

_memo: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[object, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def _config_json(module: torch.nn.Module) -> str:
    config = getattr(module, "config", {})
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return json.dumps(public, sort_keys=True, default=str)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 hex of a VAE's config and weights (module docstring).

    Memoised per module object while its tensors are unchanged: the memo is checked against
    every state-dict tensor's storage pointer, dtype, device, shape and version counter, so
    in-place updates (optimiser steps, ``load_state_dict``, ``with torch.no_grad(): p.add_(…)``)
    recompute it. Writes through ``tensor.data`` bypass the version counter and are not seen.
    """
    state = vae.state_dict(keep_vars=True)
    config = _config_json(vae)
    signature = (
        config,
        *(
            (name, t.data_ptr(), t._version, str(t.dtype), str(t.device), tuple(t.shape))
            for name, t in sorted(state.items())
        ),
    )
    memo = _memo.get(vae)
    if memo is not None and memo[0] == signature:
        return memo[1]
    digest = hashlib.sha256()
    digest.update(config.encode("utf-8"))
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\x1e{name}\x1f{t.dtype}\x1f{tuple(tensor.shape)}\x1f".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()
    _memo[vae] = (signature, fingerprint)
    return fingerprint


def latent_cache_key(vae: torch.nn.Module, size: int, geometry: str, dtype: torch.dtype) -> str:
    """The cache key of latents of ``vae`` on images prepared at ``size`` with ``geometry``.

    Args:
        vae: The autoencoder (its fingerprint is part of the key).
        size: Pixel side length the images were fitted to.
        geometry: The geometry policy (``center-crop`` | ``resize`` | ``pad``).
        dtype: The dtype the VAE encoded in.

    Returns:
        64 hex characters.
    """
    parts = {
        "vae": vae_fingerprint(vae),
        "size": int(size),
        "geometry": str(geometry),
        "dtype": str(dtype),
        "prepare": PREPARE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"invalid latent cache key {key!r}: expected 64 hex characters")
    return key


class _Tables(Protocol):
    """The table operations the cache uses (a ``LanceStore``, which also hands out caches)."""

    def read(
        self,
        name: str,
        dataset: str | None = None,
        columns: list[str] | None = None,
        where: dict[str, str | Sequence[str]] | None = None,
    ) -> pa.Table: ...
    def insert_new(self, name: str, rows: pa.Table) -> int: ...
    def has_table(self, name: str) -> bool: ...
    def table(self, name: str): ...


class LatentCache:
    """The ``latents`` table of a workspace (created on first ``put``)."""

    def __init__(self, store: _Tables) -> None:
        self.store = store

    def key(self, vae: torch.nn.Module, size: int, geometry: str, dtype: torch.dtype) -> str:
        """:func:`latent_cache_key`, for callers that hold only the cache."""
        return latent_cache_key(vae, size, geometry, dtype)

    def get(self, dataset: str, sample_ids: Sequence[str], key: str) -> dict[str, np.ndarray]:
        """Stored latents of those ``sample_ids`` that have one under ``key``.

        Args:
            dataset: The samples' dataset.
            sample_ids: Samples to look up (absent ones are simply not in the result).
            key: From :func:`latent_cache_key`.

        Returns:
            ``{sample_id: float32 array of the stored shape}``.
        """
        validate_dataset_name(dataset)
        _check_key(key)
        wanted = set(sample_ids)
        if not wanted:
            return {}
        where: dict[str, str | Sequence[str]] = {"cache_key": key}
        if len(wanted) <= _IN_LIMIT:
            where["sample_id"] = sorted(wanted)
        table = self.store.read(
            TABLE, dataset=dataset, columns=["sample_id", "shape", "latent"], where=where
        )
        out: dict[str, np.ndarray] = {}
        for sid, shape, blob in zip(
            table.column("sample_id").to_pylist(),
            table.column("shape").to_pylist(),
            table.column("latent"),
            strict=True,
        ):
            if sid in wanted and sid not in out:
                out[sid] = np.frombuffer(blob.as_py(), dtype="<f4").reshape(shape).copy()
        return out

    def put(
        self,
        dataset: str,
        sample_ids: Sequence[str],
        key: str,
        latents: np.ndarray | torch.Tensor,
    ) -> int:
        """Store latents of samples not stored under ``key`` yet, in one atomic commit.

        Args:
            dataset: The samples' dataset.
            sample_ids: One id per row of ``latents``, no duplicates.
            key: From :func:`latent_cache_key`.
            latents: ``[n, *shape]``; stored as float32.

        Returns:
            How many rows were new (0 when all were stored before).

        Raises:
            ValueError: Ids and rows disagree, ids repeat, or a latent is not finite (a broken
                VAE must not poison the cache).
        """
        validate_dataset_name(dataset)
        _check_key(key)
        if isinstance(latents, torch.Tensor):
            latents = latents.detach().to("cpu", torch.float32).numpy()
        arr = np.ascontiguousarray(latents, dtype="<f4")
        ids = list(sample_ids)
        if arr.ndim < 1 or arr.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} sample ids but latents of shape {arr.shape}")
        if len(set(ids)) != len(ids):
            raise ValueError("sample ids to cache contain duplicates")
        if not ids:
            return 0
        finite = np.isfinite(arr.reshape(len(ids), -1)).all(axis=1)
        if not finite.all():
            bad = [sid for sid, ok in zip(ids, finite, strict=True) if not ok]
            raise ValueError(f"refusing to cache non-finite latents of samples {bad[:5]}")
        n = len(ids)
        rows = pa.table(
            {
                "latent_id": [f"{key}/{sid}" for sid in ids],
                "cache_key": [key] * n,
                "dataset": [dataset] * n,
                "sample_id": ids,
                "shape": [list(arr.shape[1:])] * n,
                "latent": [row.tobytes() for row in arr],
                "created_at": [datetime.now(UTC)] * n,
            },
            schema=LATENTS,
        )
        return self.store.insert_new(TABLE, rows)

    def count(self, key: str, dataset: str | None = None) -> int:
        """Rows stored under ``key`` (optionally of one dataset)."""
        _check_key(key)
        if not self.store.has_table(TABLE):
            return 0
        where = f"cache_key = '{key}'"
        if dataset is not None:
            where += f" AND dataset = '{validate_dataset_name(dataset)}'"
        return self.store.table(TABLE).count_rows(where)
