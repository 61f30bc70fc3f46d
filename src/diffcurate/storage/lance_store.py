"""LanceDB tables of a workspace.

Writes go through ``merge_insert`` on each table's primary key, so writing the same shard twice
(a retried task, a resumed run) inserts nothing the second time: exactly-once rows without
any bookkeeping beyond the data itself. Each merge is one atomic Lance commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lancedb
import pyarrow as pa

from diffcurate.storage.schemas import TABLES
from diffcurate.storage.schemas import DatasetName as DatasetName
from diffcurate.storage.schemas import validate_dataset_name as validate_dataset_name

if TYPE_CHECKING:
    from diffcurate.storage.latent_cache import LatentCache
    from diffcurate.storage.sketches import SketchStore
    from diffcurate.workspace import Workspace


def _literal(value: str) -> str:
    """A SQL string literal (quotes doubled), for Lance filter expressions."""
    return "'" + str(value).replace("'", "''") + "'"


class LanceStore:
    """Opens (creating on first use) the workspace's LanceDB tables.

    Args:
        uri: A directory or an object-store URI (``s3://bucket/prefix``).
        storage_options: Lance object-store options (endpoint, region, ...); Lance datasets
            opened through the tables (``to_lance()``) inherit them.
    """

    def __init__(self, uri: str, storage_options: Mapping[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.db = lancedb.connect(uri, storage_options=self.storage_options or None)

    @classmethod
    def open(cls, workspace: Workspace) -> LanceStore:
        """The tables of ``workspace``, wherever it keeps them: how every caller opens them."""
        return cls(workspace.lancedb_uri, workspace.lance_storage_options)

    def table(self, name: str) -> lancedb.table.Table:
        schema, _ = TABLES[name]
        if name in self.db.list_tables().tables:
            return self.db.open_table(name)
        return self.db.create_table(name, schema=schema, exist_ok=True)

    @property
    def latents(self) -> LatentCache:
        """The ``latents`` table (VAE latents cached per sample and VAE fingerprint).

        Imported on use: the cache needs torch, which plain table access should not load.
        """
        from diffcurate.storage.latent_cache import LatentCache

        return LatentCache(self)

    def sketches(self, table: str | None = None) -> SketchStore:
        """A sketches table (dmin vectors) on the same connection settings."""
        from diffcurate.storage.sketches import SKETCH_TABLE, SketchStore

        return SketchStore(self.uri, table or SKETCH_TABLE, self.storage_options)

    def has_table(self, name: str) -> bool:
        return name in self.db.list_tables().tables

    def insert_new(self, name: str, rows: pa.Table) -> int:
        """Insert rows whose primary key is not in the table yet; returns how many were new."""
        if rows.num_rows == 0:
            return 0
        schema, key = TABLES[name]
        rows = rows.select(schema.names).cast(schema)
        result = self.table(name).merge_insert(key).when_not_matched_insert_all().execute(rows)
        return int(result.num_inserted_rows)

    def replace_dataset_rows(self, name: str, dataset: str, rows: pa.Table) -> None:
        """Replace one dataset's rows of a derived table (e.g. duplicate groups)."""
        validate_dataset_name(dataset)
        schema, _ = TABLES[name]
        tbl = self.table(name)
        tbl.delete(f"dataset = '{dataset}'")
        if rows.num_rows:
            tbl.add(rows.select(schema.names).cast(schema))

    def read(
        self,
        name: str,
        dataset: str | None = None,
        columns: list[str] | None = None,
        where: dict[str, str | Sequence[str]] | None = None,
    ) -> pa.Table:
        """Read a table as Arrow: optionally one dataset, some columns, and equality filters.

        Args:
            name: Table name.
            dataset: Only this dataset's rows.
            columns: Only these columns.
            where: ``{column: value}`` or ``{column: [values]}``; values are escaped, column
                names must be columns of the table (they come from code, never from users).
        """
        schema, _ = TABLES[name]
        if not self.has_table(name):
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        clauses = []
        if dataset is not None:
            clauses.append(f"dataset = {_literal(validate_dataset_name(dataset))}")
        for column, value in (where or {}).items():
            if column not in schema.names:
                raise ValueError(f"{name} has no column {column!r}")
            if isinstance(value, str):
                clauses.append(f"{column} = {_literal(value)}")
            elif len(value) == 0:
                return self.read(name, columns=columns).slice(0, 0)
            else:
                clauses.append(f"{column} IN ({', '.join(_literal(v) for v in value)})")
        return (
            self.table(name)
            .to_lance()
            .to_table(columns=columns, filter=" AND ".join(clauses) or None)
        )

    def count(self, name: str, dataset: str | None = None) -> int:
        if not self.has_table(name):
            return 0
        if dataset is None:
            return self.table(name).count_rows()
        validate_dataset_name(dataset)
        return self.table(name).count_rows(f"dataset = '{dataset}'")

    def key_counts(self, name: str, where: dict[str, str | Sequence[str]]) -> dict[str, int]:
        """How many rows each primary key has among the rows matching ``where``."""
        _, key = TABLES[name]
        keys = self.read(name, columns=[key], where=where).column(key).to_pylist()
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return counts

    def drop_duplicate_keys(self, name: str, keys: Sequence[str]) -> int:
        """Keep one row of each primary key in ``keys``; returns how many rows were removed.

        ``merge_insert`` makes a retried write idempotent, but two writers merging the same new
        key at the same moment (a worker presumed dead that still commits, beside the shard's
        re-run) can both insert it. Copies of a key hold equal values (scores are deterministic),
        so any one may stay. The extra rows are deleted by row id in one atomic commit.
        """
        if not keys:
            return 0
        _, key = TABLES[name]
        tbl = self.table(name)
        found = tbl.to_lance().to_table(
            columns=[key], filter=f"{key} IN ({', '.join(_literal(k) for k in keys)})",
            with_row_id=True,
        )  # fmt: skip
        seen: set[str] = set()
        extra: list[int] = []
        for k, row_id in zip(found.column(key).to_pylist(), found.column("_rowid").to_pylist(),
                             strict=True):  # fmt: skip
            if k in seen:
                extra.append(int(row_id))
            else:
                seen.add(k)
        if extra:
            tbl.delete(f"_rowid IN ({', '.join(map(str, extra))})")
        return len(extra)
