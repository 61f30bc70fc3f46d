"""Write image–caption samples in each source format diffcurate ingests.

Used by ``diffcurate demo-corpus``, by the tests (to build corpora in every format from the same
content) and by the benchmarks. The WebDataset layout follows img2dataset: shards
``00000.tar, 00001.tar, ...`` holding ``<key>.jpg|png``, ``<key>.txt`` and ``<key>.json``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class SampleFile:
    """One sample to write: encoded image bytes, caption, metadata."""

    key: str
    image: bytes
    ext: str  # "png" | "jpg" | ...
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)


def write_folder(samples: Iterable[SampleFile], out: Path) -> Path:
    """``key.ext`` + ``key.txt`` (caption) + ``key.json`` (metadata) per sample."""
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        base = out / s.key
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_name(f"{base.name}.{s.ext}").write_bytes(s.image)
        base.with_name(f"{base.name}.txt").write_text(s.caption, encoding="utf-8")
        if s.metadata:
            base.with_name(f"{base.name}.json").write_text(json.dumps(s.metadata), encoding="utf-8")
    return out


def write_manifest(samples: Iterable[SampleFile], out: Path) -> Path:
    """One parquet file with ``key``, ``image`` (bytes), ``caption`` and metadata columns."""
    rows = [{"key": s.key, "image": s.image, "caption": s.caption, **s.metadata} for s in samples]
    # from_pylist infers columns from the first row only: name the union explicitly.
    columns = list(dict.fromkeys(name for row in rows for name in row))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in columns}), out)
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tf.addfile(info, io.BytesIO(data))


def write_webdataset(
    samples: Iterable[SampleFile], out: Path, shard_size: int = 1000
) -> list[Path]:
    """img2dataset-style tar shards; the ``.json`` carries ``key``, ``caption`` and metadata."""
    out.mkdir(parents=True, exist_ok=True)
    items = list(samples)
    shards: list[Path] = []
    for start in range(0, len(items), shard_size):
        shards.append(out / f"{len(shards):05d}.tar")
        with tarfile.open(shards[-1], "w") as tf:
            for s in items[start : start + shard_size]:
                _add(tf, f"{s.key}.{s.ext}", s.image)
                _add(tf, f"{s.key}.txt", s.caption.encode("utf-8"))
                meta = {"key": s.key, "caption": s.caption, **s.metadata}
                _add(tf, f"{s.key}.json", json.dumps(meta).encode("utf-8"))
    return shards
