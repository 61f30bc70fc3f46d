"""LanceDB ``sketches`` table: DMin gradient sketches with a vector index for top-k attribution.

One row per (run, sample). ``vector`` is the sample's per-timestep sketches CONCATENATED in the
run's timestep order, a ``fixed_size_list<float32>[T·v]``; ``timesteps`` lists the T timesteps of
its v-blocks and ``sketch_dim`` is v. Why concatenated rather than one row per timestep:

* The DMin score is Σ_t ⟨q_t, x_t⟩ (seed 002, eq. 9). With concatenated vectors that sum IS one
  inner product ⟨[q_1..q_T], [x_1..x_T]⟩, so one ANN query with the dot metric ranks by the exact
  score. Per-timestep rows would need T ANN queries whose top-k' candidates are unioned and
  re-scored: the true top-k by the sum need not be in any single timestep's top-k', so recall
  then depends on an over-fetch factor nobody can pick safely.
* It is what the paper does ("we concatenate all the compressed gradients across timesteps to
  construct a KNN index", §3.1).
* A sample's timesteps are written in one atomic row, so idempotency per (run_id, sample_id)
  implies it per (run_id, sample_id, timestep): a row is never half-written.

The price: one table holds one vector width T·v (Lance indexes need a fixed width). Runs with
another width go to another table (``SketchStore(uri, table=...)``); a mismatch is refused with
a clear error rather than silently truncated.

Writes are append-only ``merge_insert`` on ``sketch_id = f"{run_id}/{sample_id}"`` (as
``LanceStore.insert_new``): re-writing a shard after a crash inserts nothing twice and never
overwrites a stored sketch.

Scores: Lance's ``dot`` distance is ``1 − ⟨q, x⟩``; :meth:`SketchStore.top_k` returns the inner
product itself (high = influential), exact mode by a flat scan (``bypass_vector_index``), indexed
mode through the ANN index. Queries are always restricted to one run: sketches of different
models, timesteps or operator seeds are not comparable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import HnswSq, IvfHnswFlat, IvfHnswSq, IvfPq

from diffcurate.storage.schemas import validate_dataset_name
from diffcurate.workspace import is_local_uri

SKETCH_TABLE = "sketches"
KEY = "sketch_id"

IndexKind = Literal["ivf_hnsw_sq", "ivf_hnsw_flat", "hnsw_sq", "ivf_pq"]

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def sketch_schema(dim: int) -> pa.Schema:
    """Arrow schema of a sketches table whose vectors have ``dim = T·v`` entries."""
    if dim < 1:
        raise ValueError(f"vector width must be >= 1, got {dim}")
    return pa.schema(
        [
            pa.field(KEY, pa.string(), nullable=False),  # f"{run_id}/{sample_id}"
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("timesteps", pa.list_(pa.int32()), nullable=False),
            pa.field("sketch_dim", pa.int32(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("written_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def validate_run_id(run_id: str) -> str:
    """Run ids end up in filter expressions and keys; keep them boring (no '/')."""
    if not _RUN_ID.match(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '_', '.', ':', '-'"
        )
    return run_id


def flatten_sketches(sketches: np.ndarray) -> np.ndarray:
    """``[n, T, v]`` (or already ``[n, T·v]``) → contiguous float32 ``[n, T·v]``."""
    arr = np.asarray(sketches, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.ndim != 2:
        raise ValueError(f"expected [n, T, v] or [n, T*v] sketches, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class TopK:
    """One query's neighbours, best first: ``scores[i] = Σ_t ⟨q_t, x_t⟩`` of ``sample_ids[i]``."""

    sample_ids: list[str]
    scores: np.ndarray


class SketchStore:
    """The sketches table of a workspace (created on first write)."""

    def __init__(
        self,
        uri: str,
        table: str = SKETCH_TABLE,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.name = table
        self.storage_options = dict(storage_options or {})
        self.db = lancedb.connect(uri, storage_options=self.storage_options or None)

    # ------------------------------------------------------------------------------ table
    def exists(self) -> bool:
        return self.name in self.db.list_tables().tables

    def _table(self) -> lancedb.table.Table:
        if not self.exists():
            raise LookupError(f"no sketches table {self.name!r} in {self.uri}")
        return self.db.open_table(self.name)

    def width(self) -> int | None:
        """The table's vector width T·v, or None before the first write."""
        if not self.exists():
            return None
        return int(self._table().schema.field("vector").type.list_size)

    def _table_for(self, dim: int) -> lancedb.table.Table:
        width = self.width()
        if width is None:
            return self.db.create_table(self.name, schema=sketch_schema(dim), exist_ok=True)
        if width != dim:
            raise ValueError(
                f"table {self.name!r} holds vectors of width {width} but these have {dim} "
                "(= timesteps × sketch_dim); write this run to another table"
            )
        return self._table()

    # ----------------------------------------------------------------------------- writes
    def write(
        self,
        run_id: str,
        dataset: str,
        sample_ids: Sequence[str],
        sketches: np.ndarray,
        timesteps: Sequence[int],
    ) -> int:
        """Insert the sketches of samples not yet stored for ``run_id``; returns how many were new.

        Args:
            run_id: The scoring run (one model, timestep list, sketch seed and dimension).
            dataset: Dataset name of the samples.
            sample_ids: One id per sketch.
            sketches: ``[n, T, v]`` from :func:`diffcurate.influence.dmin.sketch_gradients`.
            timesteps: The T timesteps, in the order of ``sketches``' second axis.
        """
        validate_run_id(run_id)
        validate_dataset_name(dataset)
        arr = np.asarray(sketches, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[1] != len(timesteps):
            raise ValueError(
                f"sketches must be [n, T, v] with T = {len(timesteps)} timesteps, got {arr.shape}"
            )
        n, n_t, v = arr.shape
        if len(sample_ids) != n:
            raise ValueError(f"{n} sketches but {len(sample_ids)} sample ids")
        if len(set(sample_ids)) != n:
            raise ValueError("duplicate sample ids in one write")
        if not np.isfinite(arr).all():
            raise FloatingPointError("non-finite values in sketches")
        if n == 0:
            return 0
        flat = flatten_sketches(arr)
        schema = sketch_schema(n_t * v)
        now = datetime.now(UTC)
        rows = pa.table(
            {
                KEY: [f"{run_id}/{s}" for s in sample_ids],
                "run_id": [run_id] * n,
                "dataset": [dataset] * n,
                "sample_id": [str(s) for s in sample_ids],
                "timesteps": [[int(t) for t in timesteps]] * n,
                "sketch_dim": [v] * n,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), n_t * v),
                "written_at": [now] * n,
            },
            schema=schema,
        )
        tbl = self._table_for(n_t * v)
        result = tbl.merge_insert(KEY).when_not_matched_insert_all().execute(rows)
        return int(result.num_inserted_rows)

    # ------------------------------------------------------------------------------ reads
    def count(self, run_id: str | None = None) -> int:
        if not self.exists():
            return 0
        if run_id is None:
            return self._table().count_rows()
        return self._table().count_rows(f"run_id = {_literal(validate_run_id(run_id))}")

    def stored_ids(self, run_id: str) -> set[str]:
        """Sample ids already stored for a run (to skip finished shards on resume)."""
        if not self.exists():
            return set()
        filt = f"run_id = {_literal(validate_run_id(run_id))}"
        col = self._table().to_lance().to_table(columns=["sample_id"], filter=filt)
        return set(col.column("sample_id").to_pylist())

    def read(self, run_id: str) -> tuple[list[str], np.ndarray]:
        """All of a run's sample ids and ``[n, T·v]`` float32 vectors (exact mode, tests)."""
        filt = f"run_id = {_literal(validate_run_id(run_id))}"
        tbl = self._table().to_lance().to_table(columns=["sample_id", "vector"], filter=filt)
        width = self.width() or 0
        values = tbl.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return tbl.column("sample_id").to_pylist(), values.reshape(tbl.num_rows, width)

    def stored_bytes(self) -> int:
        """Bytes of the table's data files on disk (excluding indexes)."""
        return _data_file_bytes(self._table().to_lance())

    # ----------------------------------------------------------------------------- index
    def create_index(
        self,
        kind: IndexKind = "ivf_hnsw_sq",
        num_partitions: int | None = 1,
        m: int = 16,
        ef_construction: int = 100,
        num_sub_vectors: int | None = None,
    ) -> None:
        """(Re)build the ANN index on ``vector`` with the dot metric.

        ``ivf_hnsw_sq`` (default): HNSW graphs over 8-bit scalar-quantised vectors, the paper's
        KNN. Its ablation (Table 6) finds detection rates flat for M >= 8 and
        ef_construction >= 100, so we default to M = 16, ef_construction = 100 (LanceDB's
        20/300 build 2x slower here for the same recall@10, 0.985 on 10k × 4096 sketches). One
        IVF partition is LanceDB's recommendation for HNSW; raise it to cap build memory on very
        large tables (then pass ``nprobes`` to :meth:`top_k`). ``ivf_pq`` is much smaller on
        disk but loses recall on these wide vectors (0.34 recall@10 on 10k × 512 clustered
        sketches) unless queries use a ``refine_factor``. Rows written after the build are still
        found (Lance scans unindexed rows); rebuild after large appends.
        """
        if kind == "ivf_hnsw_sq":
            config: object = IvfHnswSq(
                distance_type="dot",
                num_partitions=num_partitions,
                m=m,
                ef_construction=ef_construction,
            )
        elif kind == "ivf_hnsw_flat":
            config = IvfHnswFlat(
                distance_type="dot",
                num_partitions=num_partitions,
                m=m,
                ef_construction=ef_construction,
            )
        elif kind == "hnsw_sq":
            config = HnswSq(distance_type="dot", m=m, ef_construction=ef_construction)
        elif kind == "ivf_pq":
            config = IvfPq(
                distance_type="dot", num_partitions=num_partitions, num_sub_vectors=num_sub_vectors
            )
        else:
            raise ValueError(f"unknown index kind {kind!r}")
        self._table().create_index("vector", config=config, replace=True)  # type: ignore[arg-type]

    def has_index(self) -> bool:
        return self.exists() and any(
            "vector" in idx.columns for idx in self._table().list_indices()
        )

    def top_k(
        self,
        query_vectors: np.ndarray,
        k: int,
        run_id: str,
        exact: bool = False,
        ef: int | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
    ) -> list[TopK]:
        """The ``k`` training samples of ``run_id`` with the largest Σ_t ⟨q_t, x_t⟩ per query.

        Args:
            query_vectors: ``[q, T, v]`` query sketches (or ``[q, T·v]``, or one ``[T·v]``).
            k: Neighbours per query.
            run_id: The run whose sketches are searched (the query must be sketched with the
                same model, timesteps, sketch seed and dimension).
            exact: Flat scan of every row of the run (exact inner products) instead of the index.
            ef: HNSW candidate-list size (default ``max(10·k, 100)``); larger = better recall.
            nprobes: IVF partitions to search (IVF indexes with several partitions).
            refine_factor: Re-rank ``k·refine_factor`` candidates with the full vectors (PQ/SQ).

        Returns:
            One :class:`TopK` per query, best first; ``scores`` are inner products (float64).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        queries = flatten_sketches(queries)
        width = self.width()
        if width is None:
            return [TopK([], np.empty(0)) for _ in range(queries.shape[0])]
        if queries.shape[1] != width:
            raise ValueError(f"query width {queries.shape[1]} != stored width {width}")
        tbl = self._table()
        filt = f"run_id = {_literal(validate_run_id(run_id))}"
        out = []
        for q in queries:
            search = (
                tbl.search(q, vector_column_name="vector")
                .distance_type("dot")
                .where(filt, prefilter=True)
                .select(["sample_id", "_distance"])
                .limit(k)
            )
            if exact:
                search = search.bypass_vector_index()
            else:
                search = search.ef(ef if ef is not None else max(10 * k, 100))
                if nprobes is not None:
                    search = search.nprobes(nprobes)
                if refine_factor is not None:
                    search = search.refine_factor(refine_factor)
            res = search.to_arrow()
            # Lance's dot "distance" is 1 - <q, x>.
            scores = 1.0 - res.column("_distance").to_numpy().astype(np.float64)
            out.append(TopK(res.column("sample_id").to_pylist(), scores))
        return out


def _data_file_bytes(ds: object) -> int:
    """Total size of a Lance dataset's current data files (its fragments' files)."""
    total = 0
    for frag in ds.get_fragments():  # type: ignore[attr-defined]
        for data_file in frag.data_files():
            size = data_file.file_size_bytes
            if size is None:
                if not is_local_uri(ds.uri):  # type: ignore[attr-defined]
                    raise ValueError(f"{ds.uri} does not record its data files' sizes")  # type: ignore[attr-defined]
                size = os.path.getsize(os.path.join(ds.uri, "data", data_file.path))  # type: ignore[attr-defined]
            total += int(size)
    return total
