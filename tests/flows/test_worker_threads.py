"""The threads setting reaches where the work runs: Prefect's task threads and the processes of
a temporary Dask cluster (whose nannies would otherwise pin every worker to one thread)."""

from __future__ import annotations

import os

import pytest
import torch

from diffcurate.config import apply_threads
from diffcurate.flows.sharded import DaskOptions, dask_task_runner, local_cluster


@pytest.fixture
def restore_threads(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_workers_share_the_process_threads(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert DaskOptions(n_workers=2).worker_threads() == 2
    assert DaskOptions(n_workers=3).worker_threads() == 1
    assert DaskOptions(n_workers=8).worker_threads() == 1
    assert DaskOptions(n_workers=2, torch_threads=3).worker_threads() == 3
    runner = dask_task_runner(DaskOptions(n_workers=2))
    assert runner.cluster_kwargs["torch_threads"] == 2


def test_a_temporary_cluster_worker_runs_torch_with_the_given_threads():
    from distributed import Client

    with (
        local_cluster(torch_threads=2, n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc,
        Client(lc, set_as_default=False) as client,
    ):  # fmt: skip
        client.wait_for_workers(1, timeout=120)
        (threads,) = client.run(lambda: __import__("torch").get_num_threads()).values()
    assert threads == 2


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_task_runs_use_the_applied_threads(restore_threads):
    from prefect import flow, task

    @task
    def torch_threads() -> int:
        return torch.get_num_threads()

    @flow
    def probe() -> list[int]:
        futures = [torch_threads.submit() for _ in range(2)]  # task-runner threads
        return [f.result() for f in futures] + [torch_threads()]

    for n in (2, 1):
        apply_threads(n)
        assert probe() == [n, n, n]
