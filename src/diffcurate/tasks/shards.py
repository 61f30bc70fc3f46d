"""The distributed shard task: score one shard on a worker and write its rows to LanceDB.

Runs on Dask workers (through ``prefect-dask``), possibly on other hosts than the flow, so it
receives only small, picklable inputs: the LanceDB URI, the model directory, the scorer spec and
the path of the run's dataset-level state, which the parent flow computed once and saved under
the workspace (``cache/runs/<run_id>/state.pt``). Model and state are loaded once per worker
process and kept (a process scores many shards).

Idempotent, so Prefect retries, Dask's rescheduling of a killed worker's task and the parent's
re-submission of a missing shard are all safe: rows are merged on ``score_id = run_id/sample_id``
(a re-run shard inserts nothing twice) and a shard whose rows are all present is skipped.
Scores are deterministic per sample (keyed draws), so a recomputed shard gives equal rows.
Workers never touch the DuckDB ledger: only the parent flow writes it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from diffcurate.influence.registry import RunState, ScorerSpec
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.load_options import LoadOptions, files_fingerprint
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.scores import score_rows
from diffcurate.tasks.score import load_model, score_shard

_lock = threading.Lock()
_models: dict[tuple[str, str], DiffusionModel] = {}
_states: dict[str, RunState] = {}


@dataclass(frozen=True)
class ShardReport:
    """What one shard execution did, where and when (wall clock of the worker)."""

    n: int
    written: int
    skipped: bool
    started: float
    finished: float
    worker: str
    method: str = ""
    layer_names: tuple[str, ...] = ()


class ModelChangedError(RuntimeError):
    """The model directory's files changed after the run started: its scores would mix."""


def save_state(state: RunState, path: Path) -> Path:
    """Persist a run's dataset-level state for the workers (atomically: temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _cached_state(path: str) -> RunState:
    with _lock:
        if path not in _states:
            # Our own file, written by the parent flow of the same workspace.
            _states.clear()
            _states[path] = torch.load(path, weights_only=False)
        return _states[path]


def _cached_model(
    path: str, fingerprint: str, spec: ScorerSpec, load: LoadOptions | None = None
) -> DiffusionModel:
    key = (path, fingerprint)
    with _lock:
        if key not in _models:
            found = files_fingerprint(Path(path), load)
            if found != fingerprint:
                raise ModelChangedError(
                    f"the files of {path} changed since this scoring run started (or this "
                    "worker sees another copy): re-run to start a new run"
                )
            _models.clear()  # one model per worker process at a time
            _models[key] = load_model(Path(path), spec, load)
        return _models[key]


def worker_caches() -> dict[str, int]:
    """How many models and states this process holds (for tests and diagnostics)."""
    return {"models": len(_models), "states": len(_states)}


@task(name="score-write-shard", cache_policy=NO_CACHE)
def score_and_write_shard(
    lancedb_uri: str,
    dataset: str,
    run_id: str,
    sample_ids: Sequence[str],
    model_dir: str | None,
    model_fingerprint: str,
    spec: ScorerSpec,
    state_path: str | None,
    load: LoadOptions | None = None,
    geometry: str = "center-crop",
    storage_options: dict[str, str] | None = None,
) -> ShardReport:
    """Score one shard and merge its ``scores`` rows; skip it when every row is already there."""
    started = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    store = LanceStore(lancedb_uri, storage_options)
    ids = list(sample_ids)
    present = store.read("scores", columns=["sample_id"],
                         where={"run_id": run_id, "sample_id": ids})  # fmt: skip
    done = set(present.column("sample_id").to_pylist())
    if len(done) == len(ids):
        return ShardReport(len(ids), 0, True, started, time.time(), worker)
    model = None
    if model_dir is not None and spec.uses_model:
        model = _cached_model(model_dir, model_fingerprint, spec, load)
    state = None if state_path is None else _cached_state(state_path)
    # The whole shard is recomputed (a global-hessian shard is made of whole minibatches),
    # and the merge inserts only the rows that are missing.
    result = score_shard.fn(store, dataset, ids, model, spec, state, geometry)  # type: ignore[arg-type]
    written = store.insert_new("scores", score_rows(result, run_id, dataset, spec.signal))
    return ShardReport(len(ids), written, False, started, time.time(), worker, result.method,
                       tuple(result.layer_names))  # fmt: skip
