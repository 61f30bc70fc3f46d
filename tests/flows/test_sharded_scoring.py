"""Distributed sharded scoring: the score flow's shards as task runs on a local Dask cluster.

The workers are real processes (``LocalCluster(processes=True)``); one of them is SIGKILLed
while it scores a shard, and the run must still end with exactly one score per sample, equal to
single-process scoring.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from diffcurate.demo.corpus import digit_samples
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.flows.sharded import (
    DaskOptions,
    ShardedOutcome,
    coverage,
    local_cluster,
    shard_tags,
)
from diffcurate.influence.registry import EKFACOptions, ScorerSpec, TRAKOptions
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SCORES
from workspaces import ingest_samples, save_tiny_unet_model

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_SAMPLES = 48
# float64 so that scores computed in different processes and vmap chunk sizes agree to ~1e-12;
# 4 probes make a shard of 6 take about a second on one core: long enough to be killed in.
SPEC = ScorerSpec(signal="trace", probes=4, dtype="float64", seed=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A workspace with 48 ingested real digits and a saved tiny UNet."""
    root = tmp_path_factory.mktemp("sharded")
    samples, _ = digit_samples(n_duplicated=0, copies=1)
    ws = ingest_samples(root, samples[:N_SAMPLES])
    return ws, save_tiny_unet_model(root / "model")


@pytest.fixture(scope="module")
def reference(corpus):
    """Single-process scores of SPEC (the local runner, one shard)."""
    ws, model_dir = corpus
    summary = score_flow(ScoreParams(dataset="digits", model=model_dir, scorer=SPEC,
                                     workspace=ws, shard_size=N_SAMPLES, resume=False,
                                     progress=False))  # fmt: skip
    return scores_of(ws, summary.run_id)


@pytest.fixture(scope="module")
def cluster():
    """A local Dask cluster of 2 worker processes (each with a nanny that restarts it)."""
    from distributed import Client

    with (
        local_cluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc,
        # not the default client: prefect-dask would use a default client's cluster whatever
        # the address it is given
        Client(lc, set_as_default=False) as client,
    ):  # fmt: skip
        client.wait_for_workers(2, timeout=120)
        yield lc, client


def scores_of(ws, run_id) -> dict[str, float]:
    t = LanceStore(str(ws / "lancedb")).read("scores", where={"run_id": run_id})
    ids = t.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "a sample was scored twice"
    return dict(zip(ids, t.column("score").to_pylist(), strict=True))


def dask_params(ws, model_dir, **kw) -> ScoreParams:
    kw.setdefault("resume", False)
    return ScoreParams(dataset="digits", model=model_dir, scorer=SPEC, workspace=ws,
                       shard_size=6, progress=False, runner="dask", **kw)  # fmt: skip


def dask_run(ws, model_dir, **kw):
    return score_flow(dask_params(ws, model_dir, **kw))


def assert_equal_to_reference(ws, summary, reference):
    got = scores_of(ws, summary.run_id)
    assert got.keys() == reference.keys() and len(got) == N_SAMPLES
    keys = sorted(got)
    np.testing.assert_allclose([got[k] for k in keys], [reference[k] for k in keys], rtol=1e-9)
    run = Ledger(ws / "ledger.duckdb").run(summary.run_id)
    assert run.status == "completed"
    assert run.stats["scored"] + run.stats["already_scored"] == N_SAMPLES
    assert run.params["runner"] == "dask"


@pytest.mark.slow
def test_temporary_cluster_scores_equal_single_process(corpus, reference):
    ws, model_dir = corpus
    summary = dask_run(ws, model_dir, dask=DaskOptions(n_workers=2))
    assert (summary.runner, summary.samples, summary.scored) == ("dask", N_SAMPLES, N_SAMPLES)
    assert summary.workers == 2  # both worker processes scored shards, at the same time
    assert summary.peak_concurrent_shards == 2
    assert summary.method.startswith("ggn/hutchinson") and summary.layer_names
    assert summary.shard_rounds == 1 and summary.duplicates_removed == 0
    assert_equal_to_reference(ws, summary, reference)
    # per-layer parts were written by the workers too
    rows = LanceStore(str(ws / "lancedb")).read("scores", where={"run_id": summary.run_id})
    parts = rows.column("per_layer").to_pylist()
    assert all(len(p) == len(summary.layer_names) for p in parts)


def _executing_worker(client) -> str | None:
    for address, keys in client.processing().items():
        if keys:
            return address
    return None


@pytest.mark.slow
def test_killed_worker_mid_shard_still_scores_every_sample_once(corpus, reference, cluster):
    ws, model_dir = corpus
    lc, client = cluster
    store = LanceStore(str(ws / "lancedb"))
    with killing_a_busy_worker(client, store) as killed:
        summary = dask_run(ws, model_dir, dask=DaskOptions(address=lc.scheduler_address))
    assert killed, "the run ended before a worker could be killed mid-shard"
    assert killed["keys"] and 0 < killed["rows"] < N_SAMPLES  # type: ignore[operator]
    assert_equal_to_reference(ws, summary, reference)
    assert summary.scored == N_SAMPLES
    # the nanny restarted the killed worker: a new process serves the cluster
    client.wait_for_workers(2, timeout=120)
    assert killed["pid"] not in client.run(os.getpid).values()


@contextlib.contextmanager
def killing_a_busy_worker(client, store: LanceStore):
    """While the block runs, SIGKILL one worker mid-shard (once a shard has been committed);
    yields a dict that then describes the kill (address, pid, keys, rows committed before)."""
    killed: dict[str, object] = {}
    stop = threading.Event()
    args = (client, store, store.count("scores"), killed, stop)
    killer = threading.Thread(target=_kill_a_busy_worker_once, args=args, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=10)


def _kill_a_busy_worker_once(client, store, before: int, killed: dict, stop) -> None:
    """Kill a worker while it scores a shard, once at least one shard has been committed."""
    deadline = time.monotonic() + 240
    while not stop.is_set() and time.monotonic() < deadline:
        if store.count("scores") > before:
            address = _executing_worker(client)
            if address is not None:
                pid = client.run(os.getpid, workers=[address])[address]
                killed.update(address=address, pid=pid, keys=list(client.processing()[address]),
                              rows=store.count("scores") - before)  # fmt: skip
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_shard_dask_gives_up_on_is_resubmitted_by_the_flow(corpus, reference):
    """With ``allowed-failures: 0`` Dask does not reschedule a killed worker's task: the future
    errs (KilledWorker), and the flow's coverage round submits the lost shard again."""
    import dask
    from distributed import Client

    ws, model_dir = corpus
    store = LanceStore(str(ws / "lancedb"))
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        local_cluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc,
        Client(lc, set_as_default=False) as client,
        killing_a_busy_worker(client, store) as killed,
    ):  # fmt: skip
        summary = dask_run(ws, model_dir, dask=DaskOptions(address=lc.scheduler_address))
    assert killed, "the run ended before a worker could be killed mid-shard"
    assert summary.lost_shards >= 1 and summary.shard_rounds >= 2
    assert summary.resubmitted_shards >= 1
    assert_equal_to_reference(ws, summary, reference)


@pytest.mark.slow
@pytest.mark.parametrize("in_event_loop", [False, True], ids=["plain", "in-event-loop"])
def test_a_failing_shard_fails_the_run_and_writes_nothing(corpus, cluster, in_event_loop):
    """A shard task that raises (here: the model files differ from the run's fingerprint) is
    retried, then its error fails the run (after the round's other shards); no worker writes
    rows for a model it cannot vouch for. The same holds when the caller's thread runs an event
    loop (a notebook; a Playwright session earlier in the test run), where prefect's
    ``State.result`` would otherwise hand back an un-awaited coroutine instead of raising."""
    import asyncio

    from diffcurate.flows.score import model_fingerprint
    from diffcurate.flows.sharded import dask_task_runner, run_sharded
    from diffcurate.tasks.shards import ModelChangedError

    ws, model_dir = corpus
    lc, _ = cluster
    store = LanceStore(str((ws / "lancedb").resolve()))
    ids = sorted(store.read("samples", "digits", columns=["sample_id"]).column("sample_id")
                 .to_pylist())  # fmt: skip
    assert model_fingerprint(model_dir) != "stale"

    def stale_run():
        run_sharded(runner=runner, store=store, dataset="digits", run_id="score-stale",
                    shards=[ids[:6], ids[6:12]], model_dir=str(model_dir.resolve()),
                    model_fingerprint="stale", spec=SPEC, state_path=None, tags=[],
                    retries=1, max_rounds=3, log=logging.getLogger("test"))  # fmt: skip

    async def inside_a_running_loop():
        stale_run()  # a plain blocking call, made while this thread's loop runs

    def in_a_thread_running_a_loop():
        # A thread of its own (with this context's variables): this thread may already run a
        # loop, e.g. the Playwright session of the dashboard tests, and asyncio.run refuses
        # to start a second one.
        raised: list[BaseException] = []

        def target():
            try:
                asyncio.run(inside_a_running_loop())
            except BaseException as e:
                raised.append(e)

        thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))
        thread.start()
        thread.join()
        if raised:
            raise raised[0]

    with (
        dask_task_runner(DaskOptions(address=lc.scheduler_address)) as runner,
        pytest.raises(ModelChangedError, match="changed since this scoring run started"),
    ):
        in_a_thread_running_a_loop() if in_event_loop else stale_run()
    assert store.read("scores", where={"run_id": "score-stale"}).num_rows == 0


@pytest.mark.slow
def test_gpu_tag_concurrency_limit_caps_concurrent_shards(corpus, reference, cluster):
    from prefect.client.orchestration import get_client

    ws, model_dir = corpus
    lc, _ = cluster
    with get_client(sync_client=True) as api:
        api.create_concurrency_limit(tag="gpu-test", concurrency_limit=1)
    try:
        summary = dask_run(ws, model_dir, dask=DaskOptions(address=lc.scheduler_address),
                           tags=["gpu-test"])  # fmt: skip
    finally:
        with get_client(sync_client=True) as api:
            api.delete_concurrency_limit_by_tag("gpu-test")
    assert summary.peak_concurrent_shards == 1
    assert_equal_to_reference(ws, summary, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        ScorerSpec(signal="trak", dtype="float64", fit_size=12, trak=TRAKOptions(proj_dim=32)),
        ScorerSpec(signal="ekfac", dtype="float64", fit_size=12, draws_per_timestep=1,
                   ekfac=EKFACOptions(damping=1e-3)),
    ],
    ids=["trak", "ekfac"],
)  # fmt: skip
def test_dataset_level_state_is_fitted_once_and_shared_with_the_workers(corpus, cluster, spec):
    """TRAK's kernel travels in the saved run state, EK-FAC's factors on the shared cache:
    the workers' rows equal the in-process runner's, and the factors were fitted once."""
    ws, model_dir = corpus
    lc, _ = cluster
    common = {"dataset": "digits", "model": model_dir, "scorer": spec, "workspace": ws,
              "shard_size": 12, "resume": False, "progress": False}  # fmt: skip
    local = score_flow(ScoreParams(**common))
    sharded = score_flow(ScoreParams(**common, runner="dask",
                                     dask=DaskOptions(address=lc.scheduler_address)))  # fmt: skip
    assert sharded.workers >= 1 and sharded.fit_size == local.fit_size == 12
    a, b = scores_of(ws, local.run_id), scores_of(ws, sharded.run_id)
    assert a.keys() == b.keys() and len(a) == N_SAMPLES
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=1e-8)
    state = ws.resolve() / "cache" / "runs" / sharded.run_id / "state.pt"
    assert state.is_file()
    if spec.signal == "ekfac":
        assert len(list((ws / "cache" / "ekfac").glob("*/factors_*"))) == 1


PARENT = """
import sys
from diffcurate.flows.score import ScoreParams, score_flow
score_flow(ScoreParams.model_validate_json(sys.argv[1]))
"""


@pytest.mark.slow
def test_killed_parent_flow_resumes_from_the_shards_its_workers_wrote(
    corpus, reference, cluster, tmp_path
):
    """SIGKILL the orchestrating process mid-run: the ledger marks the run interrupted, the
    rows its workers committed stay, and re-running resumes it to exactly one row per sample
    (shards still running for the dead parent may commit meanwhile: merged or de-duplicated)."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    ws, model_dir = corpus
    lc, _ = cluster
    store = LanceStore(str(ws / "lancedb"))
    ledger = Ledger(ws / "ledger.duckdb")
    params = dask_params(ws, model_dir, resume=True,
                         dask=DaskOptions(address=lc.scheduler_address))  # fmt: skip
    before = store.count("scores")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    log = (tmp_path / "parent.log").open("w")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, params.model_dump_json()],
                              env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while store.count("scores") == before:
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        os.kill(parent.pid, signal.SIGKILL)
    finally:
        parent.wait(timeout=30)
    written = store.count("scores") - before
    assert 0 < written < N_SAMPLES
    (dead,) = [r for r in ledger.runs(kind="score") if r.pid == parent.pid]
    summary = score_flow(params)
    assert summary.resumed and summary.run_id == dead.run_id
    assert 0 < summary.already_scored < N_SAMPLES
    assert summary.already_scored + summary.scored == N_SAMPLES
    assert_equal_to_reference(ws, summary, reference)


def test_local_cluster_workers_keep_glibc_malloc_defaults(cluster):
    _, client = cluster
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    assert set(client.run(os.environ.get, "OMP_NUM_THREADS").values()) == {"1"}


# ------------------------------------------------------------------------- fast unit tests
def _rows(run_id: str, ids: list[str], score: float = 1.0) -> pa.Table:
    n = len(ids)
    return pa.table(
        {"score_id": [f"{run_id}/{i}" for i in ids], "run_id": [run_id] * n,
         "dataset": ["d"] * n, "sample_id": ids, "signal": ["loss"] * n, "score": [score] * n,
         "stderr": [0.0] * n, "per_layer": [None] * n, "per_timestep": [None] * n,
         "method": ["m"] * n, "scored_at": [datetime.now(UTC)] * n},
        schema=SCORES,
    )  # fmt: skip


def test_coverage_finds_gaps_and_duplicates_which_are_dropped(tmp_path):
    store = LanceStore(str(tmp_path / "db"))
    shards = [["a", "b"], ["c", "d"], ["e"]]
    store.insert_new("scores", _rows("r1", ["a", "b", "c"]))
    # two writers that both merged the same new key (what merge_insert cannot prevent)
    store.table("scores").add(_rows("r1", ["b", "c"]))
    store.table("scores").add(_rows("r1", ["c"]))
    store.insert_new("scores", _rows("r2", ["d", "e"]))  # another run: not ours
    missing, duplicated, scored = coverage(store, "r1", shards)
    assert missing == [1, 2] and sorted(duplicated) == ["r1/b", "r1/c"] and scored == 3
    assert store.drop_duplicate_keys("scores", duplicated) == 3
    assert store.key_counts("scores", where={"run_id": "r1"}) == {"r1/a": 1, "r1/b": 1, "r1/c": 1}
    assert store.count("scores") == 5


def test_peak_concurrency_and_tags():
    outcome = ShardedOutcome(intervals=[(0, 2), (1, 3), (2.5, 4), (5, 6)])
    assert outcome.peak_concurrency == 2
    assert (outcome.wall_seconds, outcome.busy_seconds) == (6, 6.5)
    assert ShardedOutcome().peak_concurrency == 0
    assert shard_tags(ScorerSpec(device="cuda"), ["x"]) == ["x", "gpu"]
    assert shard_tags(ScorerSpec(), ["x", "x"]) == ["x"]


def test_dask_runner_refuses_sketch_scorers(corpus):
    ws, model_dir = corpus
    with pytest.raises(ValueError, match="sketches are written by the local runner"):
        ScoreParams(dataset="digits", model=model_dir, scorer=ScorerSpec(signal="dmin"),
                    workspace=ws, runner="dask")  # fmt: skip
