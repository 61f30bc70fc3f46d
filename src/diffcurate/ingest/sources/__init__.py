"""Source readers. Each yields :class:`~diffcurate.ingest.records.RawRecord` in a stable order.

Readers refuse a whole source only when nothing in it can be read (missing path, malformed
manifest); row-level problems become records with a ``reason`` and are quarantined.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from diffcurate.ingest.records import RawRecord
from diffcurate.ingest.sources.errors import SourceError
from diffcurate.ingest.sources.folder import FolderSource
from diffcurate.ingest.sources.manifest import MANIFEST_EXTENSIONS, ManifestSource
from diffcurate.ingest.sources.webdataset import WebDatasetSource


class SourceFormat(StrEnum):
    AUTO = "auto"
    FOLDER = "folder"
    MANIFEST = "manifest"
    WEBDATASET = "webdataset"


Source = FolderSource | ManifestSource | WebDatasetSource

__all__ = [
    "RawRecord",
    "Source",
    "SourceError",
    "SourceFormat",
    "detect_format",
    "open_source",
]


def detect_format(path: Path) -> SourceFormat:
    """Guess the source format from what is at ``path``.

    A ``.tar`` file or a directory holding ``.tar`` shards is WebDataset (img2dataset writes
    ``.parquet`` and ``_stats.json`` files beside its shards, so tar wins over parquet); a
    ``.parquet``/``.csv`` file is a manifest; a directory of images is a folder source.
    """
    if not path.exists():
        raise SourceError(f"source does not exist: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return SourceFormat.WEBDATASET
        if suffix in MANIFEST_EXTENSIONS:
            return SourceFormat.MANIFEST
        raise SourceError(
            f"cannot tell the format of {path}: expected a .tar shard, a "
            f"{'/'.join(sorted(MANIFEST_EXTENSIONS))} manifest, or a directory"
        )
    if not path.is_dir():
        raise SourceError(f"source is neither a file nor a directory: {path}")
    try:
        names = [p.name.lower() for p in path.iterdir()]
    except OSError as err:
        raise SourceError(f"cannot read source directory {path}: {err}") from err
    if any(n.endswith(".tar") for n in names):
        return SourceFormat.WEBDATASET
    return SourceFormat.FOLDER


def open_source(
    path: Path,
    fmt: SourceFormat = SourceFormat.AUTO,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
) -> Source:
    """Open a source for reading, detecting its format unless given."""
    path = Path(path)
    if fmt == SourceFormat.AUTO:
        fmt = detect_format(path)
    elif not path.exists():
        raise SourceError(f"source does not exist: {path}")
    if fmt == SourceFormat.FOLDER:
        return FolderSource(path)
    if fmt == SourceFormat.MANIFEST:
        return ManifestSource(
            path, image_column=image_column, caption_column=caption_column, key_column=key_column
        )
    return WebDatasetSource(path)
