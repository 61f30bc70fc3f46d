"""Rows of the ``scores`` table built from a scorer's result.

Shared by the score flow (local shards) and the sharded-scoring task (each Dask worker writes
its own rows), so both write identical rows for a shard.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from diffcurate.storage.schemas import SCORES

if TYPE_CHECKING:
    from diffcurate.influence.objective import ScoreResult


def score_rows(result: ScoreResult, run_id: str, dataset: str, signal: str) -> pa.Table:
    """One ``scores`` row per sample of ``result``, keyed ``run_id/sample_id`` (the merge key
    that makes a retried write add nothing)."""
    n = len(result.sample_keys)
    now = datetime.now(UTC)

    def lists(parts: np.ndarray | None) -> list[list[float] | None]:
        return [None] * n if parts is None else [row.tolist() for row in parts]

    return pa.table(
        {
            "score_id": [f"{run_id}/{k}" for k in result.sample_keys],
            "run_id": [run_id] * n,
            "dataset": [dataset] * n,
            "sample_id": [str(k) for k in result.sample_keys],
            "signal": [signal] * n,
            "score": result.score.astype(np.float64),
            "stderr": result.stderr.astype(np.float64),
            "per_layer": lists(result.per_layer),
            "per_timestep": lists(result.per_timestep),
            "method": [result.method] * n,
            "scored_at": [now] * n,
        },
        schema=SCORES,
    )
