"""Distributed sharded scoring: the score flow's shards as task runs on a Dask cluster.

The parent (the ``score`` flow) keeps everything that must happen once: the ledger (its only
writer), the fit set and the dataset-level state (EK-FAC factors, TRAK kernel, BIF chains:
computed once, saved under the workspace, loaded once per worker process), the work list, and
the final coverage check. Each shard is a ``score-write-shard`` task run submitted through
``prefect_dask.DaskTaskRunner``; the worker that runs it writes the shard's rows to LanceDB.

Exactly once, even when workers die mid-shard:

* a shard task is idempotent (merge on ``run_id/sample_id``; a complete shard is skipped), and
  a shard's rows land in one atomic Lance commit, so a shard is either all there or absent;
* a task that raises is retried by Prefect (``shard_retries``); a task whose worker died is
  rescheduled by Dask on another worker (the nanny restarts the dead one);
* after each round the parent counts the run's rows per sample: shards with a missing sample
  are submitted again (up to ``max_rounds``), and extra copies of a row (possible only when a
  worker presumed dead still commits beside the shard's re-run) are removed;
* a task that fails for a reason of its own (a bad image, NaN loss) after its retries fails the
  run, after the round's other shards are committed, so a re-run resumes from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from diffcurate.config import resolve_threads
from diffcurate.influence.registry import ScorerSpec
from diffcurate.models.load_options import LoadOptions
from diffcurate.storage.lance_store import LanceStore
from diffcurate.tasks.shards import ShardReport, score_and_write_shard


class DaskOptions(BaseModel):
    """Where the shard tasks run: an existing Dask cluster, or a temporary local one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster (tcp://host:8786); None starts a "
        "temporary LocalCluster for the run.",
    )
    n_workers: int = Field(2, ge=1, description="Workers (processes) of the temporary cluster.")
    threads_per_worker: int = Field(
        1, ge=1, description="Threads per worker of the temporary cluster (1: one shard at a "
        "time per process; torch parallelises inside it)."
    )  # fmt: skip
    memory_limit: str = Field("auto", description="Memory limit per worker (temporary cluster).")
    torch_threads: int | None = Field(
        None, ge=1, description="torch/OpenMP threads of each worker of the temporary cluster; "
        "None: this process's threads setting shared among the workers."
    )  # fmt: skip

    def worker_threads(self) -> int:
        """The torch/OpenMP threads each temporary worker gets. Dask's nannies would start
        every worker with one; the workers of one run share the threads this process was
        given (``--threads``), so together they use what it may use, no more."""
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, resolve_threads(None) // self.n_workers)


NANNY_MALLOC_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
"""Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting it also freezes
glibc's mmap threshold, so torch maps and unmaps every large tensor: trace scoring then costs
1.7x the CPU per sample (3x the page faults; measured on this project's 2-core machines).
Temporary clusters leave it unset; for ``dask worker`` hosts, ``infra/dask.yaml`` does."""


def local_cluster(torch_threads: int | None = None, **kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` whose worker processes keep glibc's default malloc
    tuning (see :data:`NANNY_MALLOC_TRIM`) and, given ``torch_threads``, start with that many
    torch/OpenMP threads instead of the nannies' one."""
    import dask
    from distributed import LocalCluster

    # An earlier nanny of this process may have exported it; workers inherit our environment.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    if torch_threads is not None:
        # The nannies' ``env`` wins over their pre-spawn defaults and over this process's own
        # OMP_NUM_THREADS, which they would otherwise copy.
        threads = {var: str(torch_threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        kwargs["env"] = {**kwargs.get("env", {}), **threads}
    with dask.config.set({NANNY_MALLOC_TRIM: None}):
        return LocalCluster(**kwargs)


def dask_task_runner(options: DaskOptions) -> Any:
    """A ``prefect_dask.DaskTaskRunner`` for ``options`` (imported lazily: Dask is only needed
    by distributed runs). Beware: in a process that holds a default Dask client, prefect-dask
    submits to that client's cluster whatever the address (create clients with
    ``set_as_default=False``)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("runner='dask' needs prefect-dask: pip install prefect-dask") from e
    if options.address is not None:
        return DaskTaskRunner(address=options.address)
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "n_workers": options.n_workers,
            "threads_per_worker": options.threads_per_worker,
            "processes": True,
            "memory_limit": options.memory_limit,
            "dashboard_address": ":0",
            "torch_threads": options.worker_threads(),
        },
    )


def shard_tags(spec: ScorerSpec, tags: list[str]) -> list[str]:
    """The shard tasks' tags: the configured ones, plus ``gpu`` for CUDA scoring, so a Prefect
    tag concurrency limit (``prefect concurrency-limit create gpu N``) caps GPU shards."""
    out = list(dict.fromkeys(tags))
    if spec.device == "cuda" and "gpu" not in out:
        out.append("gpu")
    return out


@dataclass
class ShardedOutcome:
    """What the distributed shards did (folded into the run's summary by the score flow)."""

    written: int = 0
    rows: int = 0
    rounds: int = 0
    resubmitted: int = 0
    lost: int = 0
    duplicates_removed: int = 0
    workers: set[str] = field(default_factory=set)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    method: str = ""
    layer_names: tuple[str, ...] = ()

    @property
    def wall_seconds(self) -> float:
        """From the first shard's start to the last one's end (workers' clocks)."""
        if not self.intervals:
            return 0.0
        return max(e for _, e in self.intervals) - min(s for s, _ in self.intervals)

    @property
    def busy_seconds(self) -> float:
        """Shard execution time summed over workers."""
        return sum(e - s for s, e in self.intervals)

    @property
    def peak_concurrency(self) -> int:
        """Most shards executing at once (from the workers' wall clocks)."""
        events = sorted([(s, 1) for s, _ in self.intervals] + [(e, -1) for _, e in self.intervals])
        peak = now = 0
        for _, step in events:
            now += step
            peak = max(peak, now)
        return peak


class ShardsIncompleteError(RuntimeError):
    """Samples were still unscored after the last round (the run stays resumable)."""


def coverage(
    store: LanceStore, run_id: str, shards: list[list[str]]
) -> tuple[list[int], list[str], int]:
    """Shards (indices) with an unscored sample, score ids stored more than once, and how many
    samples the run has scored."""
    counts = store.key_counts("scores", where={"run_id": run_id})
    missing = [k for k, shard in enumerate(shards) if any(f"{run_id}/{i}" not in counts
                                                         for i in shard)]  # fmt: skip
    duplicated = [key for key, n in counts.items() if n > 1]
    return missing, duplicated, len(counts)


def run_sharded(
    *,
    runner: Any,
    store: LanceStore,
    dataset: str,
    run_id: str,
    shards: list[list[str]],
    model_dir: str | None,
    model_fingerprint: str,
    spec: ScorerSpec,
    state_path: str | None,
    tags: list[str],
    retries: int,
    max_rounds: int,
    log: Any,
    on_shard: Callable[[int], None] = lambda n: None,
    load: LoadOptions | None = None,
    geometry: str = "center-crop",
) -> ShardedOutcome:
    """Map ``score-write-shard`` over ``shards`` on ``runner`` until every sample is scored once.

    Args:
        runner: A started (entered) Prefect task runner, normally a ``DaskTaskRunner``.
        on_shard: Called with a shard's size when it completes (progress).
        load: How the workers load the checkpoint (variant, dtype, LoRA, single file).
        geometry: How the workers turn images into the model's square input.
    """
    import distributed

    task = score_and_write_shard.with_options(retries=retries, retry_delay_seconds=2, tags=tags)
    outcome = ShardedOutcome()
    store.table("scores")  # created here, not raced for by the workers
    pending = list(range(len(shards)))
    for round_no in range(1, max_rounds + 1):
        outcome.rounds = round_no
        if round_no > 1:
            outcome.resubmitted += len(pending)
            log.warning("round %d: re-submitting %d shards", round_no, len(pending))
        futures = {}
        for k in pending:
            # Plain values: Dask rebuilds tuples in task arguments, which would unwrap a
            # prefect ``quote`` (a namedtuple) into a bare tuple.
            parameters = {
                "lancedb_uri": store.uri, "dataset": dataset, "run_id": run_id,
                "sample_ids": shards[k], "model_dir": model_dir,
                "model_fingerprint": model_fingerprint, "spec": spec, "state_path": state_path,
                "load": load, "geometry": geometry, "storage_options": store.storage_options,
            }  # fmt: skip
            futures[runner.submit(task, parameters=parameters).wrapped_future] = k
        failed: list[BaseException] = []
        for fut in distributed.as_completed(list(futures), loop=runner.client.loop):
            k = futures[fut]
            try:
                state = fut.result()
            except Exception as e:  # the worker was lost more often than Dask allows, ...
                outcome.lost += 1
                log.warning("shard %d lost (%s: %s): it will be re-submitted", k,
                            type(e).__name__, e)  # fmt: skip
                continue
            # _sync: prefect returns a coroutine instead when the caller's thread runs an
            # event loop (a notebook, or a Playwright session) and no flow context is active.
            if state.is_completed():
                report: ShardReport = state.result(_sync=True)
                outcome.written += report.written
                if not report.skipped:
                    outcome.workers.add(report.worker)
                    outcome.intervals.append((report.started, report.finished))
                    outcome.method, outcome.layer_names = report.method, report.layer_names
                on_shard(report.n)
            elif state.is_crashed():
                outcome.lost += 1
                log.warning("shard %d crashed (%s): it will be re-submitted", k, state.message)
            else:
                try:
                    state.result(raise_on_failure=True, _sync=True)
                except BaseException as e:
                    failed.append(e)
                else:  # pragma: no cover - a non-final state cannot come back from Dask
                    failed.append(RuntimeError(f"shard {k} ended in state {state.type}"))
        if failed:
            raise failed[0]
        missing, duplicated, outcome.rows = coverage(store, run_id, shards)
        if duplicated:
            removed = store.drop_duplicate_keys("scores", duplicated)
            outcome.duplicates_removed += removed
            log.warning("removed %d duplicate score rows", removed)
        if not missing:
            return outcome
        pending = missing
    raise ShardsIncompleteError(
        f"{len(pending)} shards of run {run_id} still have unscored samples after {max_rounds} "
        "rounds: re-run the same command to resume"
    )
