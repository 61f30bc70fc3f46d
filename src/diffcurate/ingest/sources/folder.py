"""Folder source: images with sidecar captions (``x.jpg`` + ``x.txt`` and/or ``x.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from diffcurate.ingest.records import RawRecord, decode_caption
from diffcurate.ingest.sources.errors import SourceError
from diffcurate.storage.reasons import Reason

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_FIELDS = ("caption", "text")


class FolderSource:
    """Walks a directory tree in sorted order; the key is the path relative to the root
    without its extension (``sub/x`` for ``sub/x.jpg``).

    A ``.json`` sidecar contributes metadata, and the caption when there is no ``.txt``.
    Captions without an image are reported as ``image_missing`` rather than dropped silently.
    """

    format_name = "folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"folder source is not a directory: {self.root}")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise SourceError(f"folder source is not readable: {self.root}")
        self._groups = self._scan()

    def _scan(self) -> dict[str, dict[str, list[Path]]]:
        """Group files by key: ``{"image": [...], ".txt": [...], ".json": [...]}``."""
        groups: dict[str, dict[str, list[Path]]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                suffix = path.suffix.lower()
                slot = "image" if suffix in IMAGE_EXTENSIONS else suffix
                if slot not in ("image", ".txt", ".json"):
                    continue
                key = path.relative_to(self.root).with_suffix("").as_posix()
                groups.setdefault(key, {}).setdefault(slot, []).append(path)
        return dict(sorted(groups.items()))

    def __len__(self) -> int:
        return sum(max(1, len(files.get("image", []))) for files in self._groups.values())

    def __iter__(self) -> Iterator[RawRecord]:
        for key, files in self._groups.items():
            images = files.get("image", [])
            if not images:
                sidecar = (files.get(".txt") or files.get(".json"))[0]
                yield RawRecord(
                    key=key,
                    source=str(sidecar),
                    reason=Reason.IMAGE_MISSING,
                    detail=f"caption/metadata sidecar {sidecar.name} has no image beside it",
                )
                continue
            caption, caption_raw, metadata, reason, detail = self._read_sidecars(files)
            # Two images with one stem (x.jpg + x.png) share a key: both are yielded and the
            # pipeline quarantines the second as a duplicate id, so neither is lost silently.
            for image_path in images:
                yield self._record(key, image_path, caption, caption_raw, metadata, reason, detail)

    def _read_sidecars(
        self, files: dict[str, list[Path]]
    ) -> tuple[str | None, bytes | None, dict, Reason | None, str]:
        caption: str | None = None
        caption_raw: bytes | None = None
        metadata: dict = {}
        if ".json" in files:
            try:
                loaded = json.loads(files[".json"][0].read_bytes().decode("utf-8"))
                if not isinstance(loaded, dict):
                    raise ValueError("top level is not an object")
            except (OSError, ValueError) as err:
                return None, None, {}, Reason.METADATA_INVALID, f"{files['.json'][0].name}: {err}"
            for name in CAPTION_FIELDS:
                if name in loaded and caption is None:
                    value = loaded.pop(name)
                    caption = None if value is None else str(value)
            metadata = loaded
        if ".txt" in files:
            try:
                data = files[".txt"][0].read_bytes()
            except OSError as err:
                return None, None, metadata, Reason.CAPTION_MISSING, f"unreadable caption: {err}"
            text, reason, detail = decode_caption(data)
            if reason is not None:
                return None, data, metadata, reason, detail
            caption = text
        return caption, caption_raw, metadata, None, ""

    def _record(
        self,
        key: str,
        image_path: Path,
        caption: str | None,
        caption_raw: bytes | None,
        metadata: dict,
        reason: Reason | None,
        detail: str,
    ) -> RawRecord:
        try:
            image = image_path.read_bytes()
        except OSError as err:
            return RawRecord(
                key=key,
                source=str(image_path),
                caption=caption,
                metadata=metadata,
                reason=Reason.IMAGE_UNREADABLE,
                detail=f"cannot read {image_path}: {err}",
            )
        return RawRecord(
            key=key,
            source=str(image_path),
            image=image,
            caption=caption,
            caption_raw=caption_raw,
            metadata=metadata,
            reason=reason,
            detail=detail,
        )
