"""WebDataset source: tar shards as img2dataset writes them (``key.jpg``, ``.txt``, ``.json``).

Shards are streamed member by member (never extracted to disk), so a member named ``../x`` or
``/etc/x`` cannot write anywhere; such members are still refused and quarantined, because a
shard that contains them was not written by a well-behaved tool.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

from diffcurate.ingest.records import RawRecord, decode_caption
from diffcurate.ingest.sources.errors import SourceError
from diffcurate.storage.reasons import Reason

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Fields img2dataset writes into every .json that are not metadata about the sample itself.
_JSON_CAPTION = "caption"
_JSON_KEY = "key"


def _unsafe(name: str) -> bool:
    if ".." not in name and name[:1] not in ("/", "\\") and name[1:2] != ":":
        return False  # the common case, without building a path (this runs once per member)
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _missing_end_marker(shard: Path, offset: int) -> str | None:
    """Python's tarfile reads a truncated archive as a shorter, valid one. A complete tar ends
    with zero blocks after the last member, so check for them explicitly."""
    if shard.suffix.lower() != ".tar":  # compressed offsets are not file offsets
        return None
    with shard.open("rb") as fh:
        fh.seek(offset)
        tail = fh.read()
    if len(tail) < 512 or tail.strip(b"\0"):
        return "shard is truncated: no end-of-archive marker after the last member"
    return None


def _split(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the basename."""
    p = PurePosixPath(name)
    stem, _, ext = p.name.partition(".")
    key = (p.parent / stem).as_posix() if str(p.parent) != "." else stem
    return key, ext.lower()


class WebDatasetSource:
    """Reads one ``.tar`` shard or every ``.tar`` in a directory, in sorted order."""

    format_name = "webdataset"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            self.shards = [self.path]
        elif self.path.is_dir():
            self.shards = sorted(self.path.glob("*.tar"))
        else:
            raise SourceError(f"webdataset source does not exist: {self.path}")
        if not self.shards:
            raise SourceError(f"no .tar shards in {self.path}")

    def __iter__(self) -> Iterator[RawRecord]:
        for shard in self.shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: Path) -> Iterator[RawRecord]:
        key: str | None = None
        parts: dict[str, bytes] = {}
        problem: str | None = None
        try:
            with tarfile.open(shard, mode="r|*") as tf:
                for member in tf:
                    if member.isdir():
                        continue
                    if _unsafe(member.name) or not member.isfile():
                        what = "unsafe path" if _unsafe(member.name) else "not a regular file"
                        yield RawRecord(
                            key=f"@{member.name}",
                            source=f"{shard}#{member.name}",
                            reason=Reason.UNSAFE_PATH,
                            detail=f"tar member {member.name!r} refused: {what}",
                        )
                        continue
                    member_key, ext = _split(member.name)
                    if member_key != key:
                        if key is not None:
                            yield from self._records(shard, key, parts)
                        key, parts = member_key, {}
                    handle = tf.extractfile(member)
                    parts.setdefault(ext, handle.read() if handle is not None else b"")
                problem = _missing_end_marker(shard, tf.offset)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            problem = f"shard unreadable past this point: {err}"
        if key is not None:
            records = self._records(shard, key, parts)
            if problem is not None:
                # The last group may have lost members (caption, metadata) to the damage:
                # quarantine it rather than ingest a silently incomplete sample.
                records = (
                    replace(
                        r,
                        reason=Reason.SHARD_CORRUPT,
                        detail=f"last sample before damage: {problem}",
                    )
                    for r in records
                )
            yield from records
        if problem is not None:
            yield RawRecord(
                key=f"@{shard.name}",
                source=str(shard),
                reason=Reason.SHARD_CORRUPT,
                detail=problem,
            )

    @staticmethod
    def _records(shard: Path, key: str, parts: dict[str, bytes]) -> Iterator[RawRecord]:
        source = f"{shard}#{key}"
        metadata: dict = {}
        caption: str | None = None
        caption_raw: bytes | None = None
        reason: Reason | None = None
        detail = ""
        if "json" in parts:
            try:
                loaded = json.loads(parts["json"].decode("utf-8"))
                if not isinstance(loaded, dict):
                    raise ValueError("top level is not an object")
                json_caption = loaded.pop(_JSON_CAPTION, None)
                loaded.pop(_JSON_KEY, None)
                metadata = loaded
                caption = None if json_caption is None else str(json_caption)
            except ValueError as err:
                reason, detail = Reason.METADATA_INVALID, f"{key}.json: {err}"
        if "txt" in parts and reason is None:
            caption, reason, detail = decode_caption(parts["txt"])
            if reason is not None:
                caption_raw = parts["txt"]
        images = [ext for ext in IMAGE_EXTS if ext in parts]
        if not images:
            yield RawRecord(
                key=key,
                source=source,
                caption=caption,
                metadata=metadata,
                reason=Reason.IMAGE_MISSING,
                detail=f"no image member for key {key!r} (members: {sorted(parts)})",
            )
            return
        for ext in images:
            yield RawRecord(
                key=key,
                source=f"{source}.{ext}",
                image=parts[ext],
                caption=caption,
                caption_raw=caption_raw,
                metadata=metadata,
                reason=reason,
                detail=detail,
            )
