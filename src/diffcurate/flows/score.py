"""The score flow: a risk signal over every sample of a dataset, shard by shard, resumable.

Steps:
    1. Fingerprint the run (dataset, model files, scorer spec). If an interrupted or failed run
       has the same fingerprint, resume it; otherwise record a new run in the ledger.
    2. Load the diffusion model from its local directory.
    3. List the dataset's sample ids (sorted: shards are stable across runs) and drop those the
       run has already scored.
    4. For each shard: load and convert its images, compute the signal, write ``scores`` rows
       (merge on ``run_id/sample_id``: a retried or resumed shard adds nothing twice).
    5. Close the run with summary statistics, layer names and timesteps.

Scores never depend on shard boundaries: the (t, ε) draws and probes are keyed by sample id.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.flows.progress import progress_bar
from diffcurate.influence.objective import ScoreResult
from diffcurate.influence.registry import ScorerSpec
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SCORES
from diffcurate.tasks.score import load_model, score_shard, write_scores


class ScoreParams(BaseModel):
    """Parameters of one scoring run (JSON-serialisable, for deployments too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Dataset to score (as ingested).")
    model: Path = Field(description="Local diffusers model directory (unet/ + scheduler/).")
    scorer: ScorerSpec = Field(default_factory=ScorerSpec)
    workspace: Path = Path("workspace")
    shard_size: int = Field(256, ge=1, description="Samples per shard (unit of commit/resume).")
    resume: bool = Field(True, description="Resume an interrupted run with the same fingerprint.")
    progress: bool = True


class ScoreSummary(BaseModel):
    """What a scoring run did; stored as the run's ``stats`` in the ledger."""

    run_id: str
    dataset: str
    signal: str
    resumed: bool = False
    samples: int = 0
    scored: int = 0
    already_scored: int = 0
    method: str = ""
    layer_names: list[str] = Field(default_factory=list)
    timesteps: list[int] = Field(default_factory=list)
    score_quantiles: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a model directory's files (path, size, mtime): cheap, and changes whenever
    weights are rewritten. Hashing multi-GB weights on every run would cost minutes."""
    entries = sorted(
        (str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in model_dir.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256(json.dumps([str(model_dir.resolve()), entries]).encode()).hexdigest()


def run_fingerprint(params: ScoreParams) -> str:
    spec = params.scorer.model_dump(mode="json")
    spec["timesteps"] = list(params.scorer.effective_timesteps)
    payload = {"dataset": params.dataset, "model": model_fingerprint(params.model), "spec": spec}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _rows(result: ScoreResult, run_id: str, dataset: str, signal: str) -> pa.Table:
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


@flow(name="score", validate_parameters=True)
def score_flow(params: ScoreParams) -> ScoreSummary:
    """Score every sample of a dataset with one risk signal; resumable."""
    log = get_run_logger()
    started = time.perf_counter()
    store = LanceStore(str(params.workspace / "lancedb"))
    ledger = Ledger(params.workspace / "ledger.duckdb")
    spec = params.scorer
    # 1. Run identity.
    if not params.model.is_dir():
        raise FileNotFoundError(f"model directory not found: {params.model}")
    fingerprint = run_fingerprint(params)
    run_id = ledger.resumable_run("score", fingerprint) if params.resume else None
    resumed = run_id is not None
    if run_id is not None:
        ledger.reopen_run(run_id)
        log.warning("resuming interrupted run %s", run_id)
    else:
        run_id = ledger.start_run(
            "score",
            dataset=params.dataset,
            source=str(params.model),
            params={**params.model_dump(mode="json"), "fingerprint": fingerprint},
        )
    summary = ScoreSummary(
        run_id=run_id, dataset=params.dataset, signal=spec.signal, resumed=resumed,
        timesteps=list(spec.effective_timesteps),
    )  # fmt: skip
    try:
        # 2. Model.
        model = load_model(params.model, spec)
        # 3. Work list.
        ids = sorted(
            store.read("samples", params.dataset, columns=["sample_id"])
            .column("sample_id")
            .to_pylist()
        )
        if not ids:
            raise ValueError(f"dataset {params.dataset!r} has no samples: ingest it first")
        done = set(
            store.read("scores", columns=["sample_id"], where={"run_id": run_id})
            .column("sample_id")
            .to_pylist()
        )
        todo = [i for i in ids if i not in done]
        summary.samples, summary.already_scored = len(ids), len(done)
        # 4. Shards.
        with progress_bar("score", params.progress) as bar:
            task = bar.add_task("score", total=len(ids), completed=len(done))
            for start in range(0, len(todo), params.shard_size):
                shard = todo[start : start + params.shard_size]
                result = score_shard(store, params.dataset, quote(shard), quote(model), spec)
                summary.scored += write_scores(
                    store, quote(_rows(result, run_id, params.dataset, spec.signal))
                )
                summary.method = result.method
                summary.layer_names = list(result.layer_names)
                bar.update(task, advance=len(shard))
        # 5. Close.
        scores = store.read("scores", columns=["score"], where={"run_id": run_id})
        values = scores.column("score").to_numpy()
        summary.score_quantiles = {
            q: float(np.quantile(values, float(q))) for q in ("0.01", "0.5", "0.99")
        }
        summary.seconds = round(time.perf_counter() - started, 3)
    except BaseException as err:
        ledger.finish_run(run_id, status="failed", stats=summary.model_dump(), error=repr(err))
        raise
    ledger.finish_run(run_id, status="completed", stats=summary.model_dump())
    return summary
