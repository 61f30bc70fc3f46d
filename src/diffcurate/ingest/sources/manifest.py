"""Manifest source: a parquet or CSV table with image bytes or paths, captions and metadata."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from diffcurate.ingest.records import RawRecord, decode_caption
from diffcurate.ingest.sources.errors import SourceError
from diffcurate.storage.reasons import Reason

MANIFEST_EXTENSIONS = frozenset({".parquet", ".csv", ".tsv"})
# Column names tried, in order, when the user does not name them. They cover img2dataset's
# parquet, LAION metadata (TEXT), Hugging Face image datasets ({"bytes", "path"} structs) and
# the common hand-written manifests.
IMAGE_COLUMNS = (
    "image",
    "image_bytes",
    "jpg",
    "png",
    "image_path",
    "path",
    "file_name",
    "filepath",
)
CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt")
KEY_COLUMNS = ("key", "id", "sample_id")
_READ_ROWS = 1024


def _pick(
    names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str
) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{what} column {wanted!r} not in manifest columns {names}")
        return wanted
    return next((c for c in candidates if c in names), None)


class ManifestSource:
    """Streams a parquet/CSV manifest in record batches (memory bounded by batch size).

    Image paths are resolved relative to the manifest's directory. Columns other than the
    image, caption and key columns are kept as free-form metadata.
    """

    format_name = "manifest"

    def __init__(
        self,
        path: Path,
        *,
        image_column: str | None = None,
        caption_column: str | None = None,
        key_column: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"manifest is not a readable file: {self.path}")
        self._is_csv = self.path.suffix.lower() in {".csv", ".tsv"}
        schema, self._num_rows = self._open_schema()
        names = schema.names
        self.image_column = _pick(names, image_column, IMAGE_COLUMNS, "image")
        if self.image_column is None:
            raise SourceError(
                f"manifest {self.path} has no image column; looked for {list(IMAGE_COLUMNS)}, "
                f"found {names}. Name it with --image-column."
            )
        self.caption_column = _pick(names, caption_column, CAPTION_COLUMNS, "caption")
        self.key_column = _pick(names, key_column, KEY_COLUMNS, "key")
        used = {self.image_column, self.caption_column, self.key_column}
        self.metadata_columns = [n for n in names if n not in used]

    def _open_schema(self) -> tuple[pa.Schema, int | None]:
        try:
            if self._is_csv:
                with self._csv_reader() as reader:
                    return reader.schema, None
            pf = pq.ParquetFile(self.path)
            return pf.schema_arrow, pf.metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            kind = "CSV" if self._is_csv else "parquet"
            raise SourceError(f"malformed {kind} manifest {self.path}: {err}") from err

    def _csv_reader(self) -> pacsv.CSVStreamingReader:
        # Captions are read as raw bytes so that a non-UTF-8 caption quarantines one row
        # instead of failing the whole file.
        return pacsv.open_csv(
            self.path,
            parse_options=pacsv.ParseOptions(delimiter="\t" if self.path.suffix == ".tsv" else ","),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.binary() for c in CAPTION_COLUMNS}
            ),
        )

    def __len__(self) -> int:
        if self._num_rows is None:
            raise TypeError("CSV manifests have no cheap row count")
        return self._num_rows

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self._is_csv:
            with self._csv_reader() as reader:
                yield from reader
        else:
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=_READ_ROWS)

    def __iter__(self) -> Iterator[RawRecord]:
        index = 0
        try:
            for batch in self._batches():
                for row in batch.to_pylist():
                    yield self._record(index, row)
                    index += 1
        except (pa.ArrowException, OSError) as err:
            yield RawRecord(
                key=f"@row{index}",
                source=f"{self.path}#row={index}",
                reason=Reason.SHARD_CORRUPT,
                detail=f"manifest unreadable from row {index} on: {err}",
            )

    def _record(self, index: int, row: dict[str, Any]) -> RawRecord:
        source = f"{self.path}#row={index}"
        metadata = {c: row[c] for c in self.metadata_columns}
        caption, caption_raw, reason, detail = None, None, None, ""
        value = row.get(self.caption_column) if self.caption_column else None
        if isinstance(value, (bytes, bytearray)):
            caption, reason, detail = decode_caption(bytes(value))
            if reason is not None:
                caption_raw = bytes(value)
        elif value is not None:
            caption = str(value)

        image, image_path = self._image_of(row.get(self.image_column))
        key = self._key_of(index, row, image_path)
        if key is None:
            return RawRecord(
                key=f"@row{index}",
                source=source,
                reason=Reason.KEY_MISSING,
                detail=f"key column {self.key_column!r} is null",
            )
        if image is None and reason is None:
            if image_path is None:
                reason, detail = Reason.IMAGE_MISSING, "image column is null"
            else:
                image, reason, detail = self._read_path(image_path)
        return RawRecord(
            key=key,
            source=source,
            image=image,
            caption=caption,
            caption_raw=caption_raw,
            metadata=metadata,
            reason=reason,
            detail=detail,
        )

    @staticmethod
    def _image_of(value: Any) -> tuple[bytes | None, str | None]:
        if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            return value.get("bytes"), value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), None
        if isinstance(value, str):
            return None, value
        return None, None

    def _key_of(self, index: int, row: dict[str, Any], image_path: str | None) -> str | None:
        if self.key_column is not None:
            value = row.get(self.key_column)
            return None if value is None else str(value)
        if image_path is not None:
            return PurePosixPath(image_path).with_suffix("").as_posix()
        return f"row-{index:09d}"

    def _read_path(self, image_path: str) -> tuple[bytes | None, Reason | None, str]:
        path = Path(image_path)
        if not path.is_absolute():
            path = self.path.parent / path
        try:
            return path.read_bytes(), None, ""
        except FileNotFoundError:
            return None, Reason.IMAGE_MISSING, f"image file not found: {path}"
        except OSError as err:
            return None, Reason.IMAGE_UNREADABLE, f"cannot read {path}: {err}"
