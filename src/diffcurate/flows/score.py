"""The score flow: a scorer over every sample of a dataset, shard by shard, resumable.

Steps:
    1. Fingerprint the run (dataset, model files, scorer spec). If an interrupted or failed run
       has the same fingerprint, resume it; otherwise record a new run in the ledger.
    2. Load the diffusion model from its local directory (unless the scorer is model-free).
    3. List the dataset's sample ids (sorted: shards are stable across runs), group them into
       the scorer's units of work (single samples; whole minibatches for ``global-hessian``)
       and drop the units the run has already scored.
    4. Compute the run's dataset-level state once, as the scorer needs: the fit set and EK-FAC
       factors / TRAK kernel / BIF chains, or the CLIP embeddings (see ``prepare_scorer``).
    5. For each shard: load and convert its images, compute the signal, write ``scores`` rows
       (merge on ``run_id/sample_id``: a retried or resumed shard adds nothing twice). Sketch
       scorers (``dmin``) write to the ``sketches`` table instead, and build their ANN index
       after the last shard. With ``runner="dask"`` the shards are task runs on a Dask cluster
       (``prefect-dask``), each writing its own rows; the dataset-level state is saved once
       under ``WORKSPACE/cache/runs/<run_id>/`` for the workers, and the flow re-submits
       shards until every sample has exactly one row (:mod:`diffcurate.flows.sharded`).
    6. Close the run with summary statistics, layer names and timesteps. Only this flow writes
       the ledger; workers write LanceDB rows.

Scores never depend on shard boundaries: the (t, ε) draws and probes are keyed by sample id,
and dataset-level state is computed from the whole dataset's ids, not from a shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from prefect import flow, get_run_logger, tags
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffcurate.flows.progress import progress_bar
from diffcurate.flows.sharded import DaskOptions, dask_task_runner, run_sharded, shard_tags
from diffcurate.influence.registry import RunState, ScorerSpec, batch_units
from diffcurate.models.images import Geometry
from diffcurate.models.load_options import LoadOptions, files_fingerprint
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.scores import score_rows
from diffcurate.storage.sketches import SKETCH_TABLE, SketchStore
from diffcurate.tasks.score import (
    load_model,
    prepare_scorer,
    score_shard,
    scoring_objective,
    sketch_shard,
    write_scores,
    write_sketches,
)
from diffcurate.tasks.shards import save_state
from diffcurate.workspace import Workspace


class ScoreParams(BaseModel):
    """Parameters of one scoring run (JSON-serialisable, for deployments too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Dataset to score (as ingested).")
    model: Path | None = Field(
        None,
        description="Local diffusers model directory (unet/ + scheduler/); not needed by the "
        "model-free random and clip-knn scorers.",
    )
    load: LoadOptions = Field(
        default_factory=LoadOptions,
        description="How the checkpoint is held: variant, dtype, LoRA adapters, single file.",
    )
    scorer: ScorerSpec = Field(default_factory=ScorerSpec)
    geometry: Geometry = Field(
        "center-crop", description="How non-square images become the model's square input."
    )
    workspace: Path = Path("workspace")
    shard_size: int = Field(256, ge=1, description="Samples per shard (unit of commit/resume).")
    resume: bool = Field(True, description="Resume an interrupted run with the same fingerprint.")
    progress: bool = True
    runner: Literal["local", "dask"] = Field(
        "local",
        description="local: shards one after another in this process; dask: shards as task "
        "runs on a Dask cluster (see `dask`), each worker writing its rows to LanceDB.",
    )
    dask: DaskOptions = Field(default_factory=DaskOptions)
    shard_retries: int = Field(2, ge=0, description="dask: Prefect retries of a failing shard.")
    max_rounds: int = Field(
        3, ge=1, description="dask: rounds of re-submitting shards whose rows are missing."
    )
    tags: list[str] = Field(
        default_factory=list,
        description="Tags of the shard task runs, for Prefect tag concurrency limits; `gpu` is "
        "added when the scorer runs on cuda.",
    )

    @model_validator(mode="after")
    def _model_given(self) -> ScoreParams:
        if self.model is None and self.scorer.uses_model:
            raise ValueError(f"the {self.scorer.signal} scorer needs a model directory")
        if self.runner == "dask" and not self.scorer.is_risk:
            raise ValueError(
                f"runner='dask' shards risk scorers; {self.scorer.signal} sketches are written "
                "by the local runner"
            )
        return self


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
    fit_size: int = 0
    state_seconds: float = 0.0
    state_disk_bytes: int = Field(0, description="Run state the workers read (RunState).")
    state_memory_bytes: int = Field(0, description="Worker memory for it, beyond the model.")
    sketch_table: str = ""
    sketch_index: str = ""
    seconds: float = 0.0
    runner: str = "local"
    workers: int = Field(0, description="dask: distinct worker processes that scored shards.")
    shard_rounds: int = 0
    resubmitted_shards: int = Field(0, description="dask: shards submitted again by the flow.")
    lost_shards: int = Field(0, description="dask: shard runs lost with their worker.")
    duplicates_removed: int = 0
    peak_concurrent_shards: int = 0
    shard_seconds: float = Field(0.0, description="dask: first shard start to last shard end.")
    worker_seconds: float = Field(0.0, description="dask: shard execution time, all workers.")


def model_fingerprint(model_dir: Path, options: LoadOptions | None = None) -> str:
    """Identity of the files a model is loaded from (see :func:`files_fingerprint`)."""
    return files_fingerprint(model_dir, options)


def run_fingerprint(params: ScoreParams) -> str:
    spec = params.scorer.fingerprint_payload()
    model = "none" if params.model is None else model_fingerprint(params.model, params.load)
    payload = {"dataset": params.dataset, "model": model, "spec": spec}
    if params.geometry != "center-crop":  # run identities from before the option stay valid
        payload["geometry"] = params.geometry
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def shards_of(units: list[list[str]], shard_size: int) -> list[list[str]]:
    """Consecutive units joined into shards of at least ``shard_size`` samples (the last may be
    smaller); a unit is never split."""
    shards: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        current.extend(unit)
        if len(current) >= shard_size:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return shards


def sketch_table_for(store: LanceStore, width: int) -> SketchStore:
    """The ``sketches`` table, or ``sketches_<width>`` when it holds another vector width
    (one Lance table holds one width)."""
    sketches = store.sketches()
    if sketches.width() in (None, width):
        return sketches
    return store.sketches(f"{SKETCH_TABLE}_{width}")


def _score_distributed(
    params: ScoreParams,
    run_id: str,
    shards: list[list[str]],
    uses_model: bool,
    state: RunState | None,
    summary: ScoreSummary,
    on_shard: Callable[[int], None],
) -> None:
    """Step 5 on a Dask cluster: save the run state for the workers, map the shards."""
    log = get_run_logger()
    layout = Workspace(params.workspace).resolved()
    state_path = None
    if state is not None:
        state_path = str(save_state(state, layout.run_state_path(run_id)))
    model_dir = str(params.model.resolve()) if uses_model and params.model is not None else None
    store = LanceStore.open(layout)
    with dask_task_runner(params.dask) as runner:
        outcome = run_sharded(
            runner=runner, store=store, dataset=params.dataset, run_id=run_id, shards=shards,
            model_dir=model_dir,
            model_fingerprint=(
                "" if model_dir is None else model_fingerprint(Path(model_dir), params.load)
            ),
            spec=params.scorer, state_path=state_path,
            tags=shard_tags(params.scorer, params.tags), retries=params.shard_retries,
            max_rounds=params.max_rounds, log=log, on_shard=on_shard, load=params.load,
            geometry=params.geometry,
        )  # fmt: skip
    # Rows this run added: a shard whose worker died after its commit wrote rows that no
    # completed task reports, so count them in the table rather than summing the reports.
    summary.scored = outcome.rows - summary.already_scored
    summary.method = outcome.method or summary.method
    summary.layer_names = list(outcome.layer_names)
    summary.workers = len(outcome.workers)
    summary.shard_rounds = outcome.rounds
    summary.resubmitted_shards = outcome.resubmitted
    summary.lost_shards = outcome.lost
    summary.duplicates_removed = outcome.duplicates_removed
    summary.peak_concurrent_shards = outcome.peak_concurrency
    summary.shard_seconds = round(outcome.wall_seconds, 3)
    summary.worker_seconds = round(outcome.busy_seconds, 3)


@flow(name="score", validate_parameters=True)
def score_flow(params: ScoreParams) -> ScoreSummary:
    """Score every sample of a dataset with one scorer (or sketch it, for dmin); resumable."""
    log = get_run_logger()
    started = time.perf_counter()
    layout = Workspace(params.workspace)
    store = LanceStore.open(layout)
    ledger = Ledger(layout.ledger_path)
    spec = params.scorer
    # 1. Run identity.
    if params.model is not None and not params.model.exists():
        raise FileNotFoundError(f"model not found: {params.model}")
    fingerprint = run_fingerprint(params)
    distributed = params.runner == "dask"
    # Workers may run elsewhere: give them absolute paths (a shared file system or mount).
    cache_dir = (layout.resolved() if distributed else layout).cache_dir
    with ledger.recording(
        "score", dataset=params.dataset, source=str(params.model or "-"),
        params={**params.model_dump(mode="json"), "fingerprint": fingerprint},
        resume=fingerprint if params.resume else None,
    ) as run:  # fmt: skip
        run_id, resumed = run.run_id, run.resumed
        if resumed:
            log.warning("resuming interrupted run %s", run_id)
        summary = ScoreSummary(
            run_id=run_id, dataset=params.dataset, signal=spec.signal, resumed=resumed,
            timesteps=list(spec.effective_timesteps), runner=params.runner,
        )  # fmt: skip
        run.stats = summary.model_dump
        # 2. Model.
        model = None
        if params.model is not None and spec.uses_model:
            model = load_model(params.model, spec, params.load)
            summary.timesteps = list(scoring_objective(spec, model).schedule.timesteps or ())
        # 3. Work list.
        ids = sorted(
            store.read("samples", params.dataset, columns=["sample_id"])
            .column("sample_id")
            .to_pylist()
        )
        if not ids:
            raise ValueError(f"dataset {params.dataset!r} has no samples: ingest it first")
        sketches = None
        if spec.is_risk:
            done = set(
                store.read("scores", columns=["sample_id"], where={"run_id": run_id})
                .column("sample_id")
                .to_pylist()
            )
        else:
            width = len(summary.timesteps) * spec.scorer.sketch_dim(spec)
            sketches = sketch_table_for(store, width)
            summary.sketch_table = sketches.name
            done = sketches.stored_ids(run_id)
        units = [u for u in batch_units(ids, spec) if not all(i in done for i in u)]
        shards = shards_of(units, params.shard_size)
        summary.samples, summary.already_scored = len(ids), len(done)
        # 4. Dataset-level state, once per run.
        state = None
        if shards and spec.is_risk:
            t0 = time.perf_counter()
            state = prepare_scorer(store, params.dataset, quote(ids), quote(model), spec, cache_dir,
                                   params.geometry)  # fmt: skip
            summary.state_seconds = round(time.perf_counter() - t0, 3)
            summary.fit_size = 0 if state.fit is None else len(state.fit.keys)
            summary.state_disk_bytes, summary.state_memory_bytes = state.shared_bytes()
        # 5. Shards.
        with progress_bar("score", params.progress) as bar, tags(*shard_tags(spec, params.tags)):
            task = bar.add_task("score", total=len(ids), completed=len(done))
            if distributed and shards:
                _score_distributed(params, run_id, shards, model is not None, state,
                                   summary, lambda n: bar.update(task, advance=n))  # fmt: skip
                shards = []
            for shard in shards:
                if sketches is not None:
                    assert model is not None
                    values = sketch_shard(store, params.dataset, quote(shard), quote(model), spec,
                                          params.geometry)  # fmt: skip
                    summary.scored += write_sketches(
                        sketches, run_id, params.dataset, quote(shard), quote(values),
                        summary.timesteps,
                    )  # fmt: skip
                    summary.method = spec.scorer.sketch_method(spec)
                else:
                    result = score_shard(store, params.dataset, quote(shard), quote(model), spec,
                                         quote(state), params.geometry)  # fmt: skip
                    summary.scored += write_scores(
                        store, quote(score_rows(result, run_id, params.dataset, spec.signal))
                    )
                    summary.method = result.method
                    summary.layer_names = list(result.layer_names)
                bar.update(task, advance=len(shard))
        # 6. Close.
        if sketches is not None:
            index = spec.scorer.sketch_index(spec)
            if index != "none":
                sketches.create_index(kind=index)
                summary.sketch_index = index
        else:
            scores = store.read("scores", columns=["score"], where={"run_id": run_id})
            values = scores.column("score").to_numpy()
            summary.score_quantiles = {
                q: float(np.quantile(values, float(q))) for q in ("0.01", "0.5", "0.99")
            }
        summary.seconds = round(time.perf_counter() - started, 3)
    return summary
