"""The ``duplicates`` table: a dataset's duplicate groups, recomputed from its stored samples.

Ingestion owns it because the groups come from the hashes and embeddings ingestion computes;
storage only provides the tables (storage never imports ingest).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffcurate.ingest.dedup import DuplicateGroups, duplicate_groups
from diffcurate.storage.lance_store import LanceStore


def _embedding_sets(table: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and embeddings per embedding model (cosine is only meaningful within one model)."""
    models = table.column("embedding_model")
    sets = []
    for model in pc.unique(models).drop_null().to_pylist():
        rows = np.flatnonzero(pc.equal(models, model).fill_null(False).to_numpy())
        lists = table.column("image_embedding").take(pa.array(rows)).combine_chunks()
        flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        sets.append((rows, flat.reshape(len(rows), -1)))
    return sets


def write_duplicate_groups(
    store: LanceStore,
    dataset: str,
    run_id: str,
    *,
    phash_max_distance: int,
    clip_threshold: float,
) -> DuplicateGroups:
    """Recompute duplicate groups for all of a dataset's samples and replace its rows."""
    cols = ["sample_id", "sha256", "phash", "embedding_model", "image_embedding"]
    table = store.read("samples", dataset=dataset, columns=cols)
    groups = duplicate_groups(
        table.column("sample_id").to_pylist(),
        table.column("sha256").to_pylist(),
        table.column("phash").to_pylist(),
        _embedding_sets(table),
        phash_max_distance=phash_max_distance,
        clip_threshold=clip_threshold,
    )
    rows = pa.table(
        {
            "sample_id": table.column("sample_id"),
            "dataset": pa.array([dataset] * table.num_rows, pa.string()),
            "exact_group": pa.array(groups.exact_group, pa.string()),
            "exact_group_size": pa.array(groups.exact_group_size, pa.int32()),
            "near_group": pa.array(groups.near_group, pa.string()),
            "near_group_size": pa.array(groups.near_group_size, pa.int32()),
            "near_method": pa.array([groups.near_method] * table.num_rows, pa.string()),
            "run_id": pa.array([run_id] * table.num_rows, pa.string()),
        }
    )
    store.replace_dataset_rows("duplicates", dataset, rows)
    return groups
