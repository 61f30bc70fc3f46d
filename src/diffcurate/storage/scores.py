"""Rows of the ``scores`` table built from a scorer's result.

Shared by the score flow (local shards) and the sharded-scoring task (each Dask worker writes
its own rows), so both write identical rows for a shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pyarrow as pa

from diffcurate.storage.schemas import SCORES


class ScoredSamples(Protocol):
    """What a row needs of a scorer's result (``influence.objective.ScoreResult`` has it).

    A protocol rather than an import: storage sits below the scorers and never imports them.
    """

    @property
    def sample_keys(self) -> Sequence[int | str]: ...
    @property
    def score(self) -> np.ndarray: ...
    @property
    def stderr(self) -> np.ndarray: ...
    @property
    def per_layer(self) -> np.ndarray | None: ...
    @property
    def per_timestep(self) -> np.ndarray | None: ...
    @property
    def method(self) -> str: ...


def score_rows(result: ScoredSamples, run_id: str, dataset: str, signal: str) -> pa.Table:
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
