"""Prefect deployments, work pools and GPU concurrency limits for running diffcurate at scale.

Two ways to schedule the flows, both with module-path entrypoints (the code is installed where
it runs: the worker image of ``infra/Dockerfile``, or this virtualenv):

* ``infra/prefect.yaml``, applied by ``diffcurate deploy apply`` (which creates the work pools
  and the ``gpu`` tag concurrency limit first, then registers every deployment of the file
  with its ``{{ $DIFFCURATE_* }}`` variables filled in, as ``prefect deploy --all`` would):
  deployments served by workers of the ``cpu`` and ``gpu`` pools;
* ``diffcurate deploy serve``: one process that registers a scheduled hygiene deployment and
  runs its runs itself (``prefect.serve``), no work pool or worker needed.

Nothing here imports torch: a flow module is imported only when its deployment is built.
"""

from __future__ import annotations

import copy
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PREFECT_FILE = Path("infra/prefect.yaml")
DEFAULT_CRON = "0 3 * * *"
DEFAULT_DASK_ADDRESS = "tcp://dask-scheduler:8786"
GPU_TAG = "gpu"
"""Tag of GPU task runs (shard tasks on cuda); its concurrency limit caps them cluster-wide."""


@dataclass(frozen=True)
class PoolSpec:
    """A work pool diffcurate's deployments use."""

    name: str
    description: str
    env: dict[str, str]


POOLS: dict[str, PoolSpec] = {
    "cpu": PoolSpec("cpu", "diffcurate: ingest and other CPU-only flows (process workers).", {}),
    "gpu": PoolSpec(
        "gpu",
        "diffcurate: scoring and hygiene runs on GPU hosts (process workers started from the "
        "infra/Dockerfile image, one per GPU host).",
        {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "DIFFUSERS_VERBOSITY": "error"},
    ),
}


def pool_template(name: str) -> dict[str, Any]:
    """The base job template of pool ``name``: Prefect's process-worker template with the pool's
    environment as the default of its ``env`` variable (what ``infra/work-pools/NAME.json``
    holds, for ``prefect work-pool create NAME --type process --base-job-template``)."""
    from prefect.workers.process import ProcessWorker

    spec = POOLS[name]
    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    if spec.env:
        template["variables"]["properties"]["env"]["default"] = dict(spec.env)
    return template


def ensure_pools(
    gpu_slots: int | None = None, gpu_runs: int | None = None, client: Any = None
) -> list[str]:
    """Create (or update) the ``cpu`` and ``gpu`` work pools and, with ``gpu_slots``, the
    ``gpu`` tag concurrency limit (at most that many GPU task runs at once, across every
    worker). ``gpu_runs`` caps the flow runs of the ``gpu`` pool. Returns what was done."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    done = []
    with get_client(sync_client=True) if client is None else nullcontext(client) as api:
        for spec in POOLS.values():
            pool = WorkPoolCreate(
                name=spec.name, type="process", description=spec.description,
                base_job_template=pool_template(spec.name),
                concurrency_limit=gpu_runs if spec.name == "gpu" else None,
            )  # fmt: skip
            api.create_work_pool(pool, overwrite=True)
            done.append(f"work pool {spec.name!r} (process)")
        if gpu_slots is not None:
            api.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpu_slots)
            done.append(f"tag concurrency limit {GPU_TAG!r}: {gpu_slots} task runs")
    return done


def deploy_env(
    *,
    dataset: str,
    model: Path,
    workspace: Path,
    cron: str = DEFAULT_CRON,
    dask_address: str = DEFAULT_DASK_ADDRESS,
    source: Path | None = None,
    timezone: str = "UTC",
) -> dict[str, str]:
    """The ``{{ $DIFFCURATE_* }}`` variables of ``infra/prefect.yaml``. Paths are as the
    workers see them (a shared volume), so they are kept as given, only made absolute."""
    from diffcurate.storage.lance_store import validate_dataset_name

    validate_dataset_name(dataset)
    source = Path("/data/incoming") / dataset if source is None else source
    return {
        "DIFFCURATE_DATASET": dataset,
        "DIFFCURATE_MODEL": str(model.absolute()),
        "DIFFCURATE_WORKSPACE": str(workspace.absolute()),
        "DIFFCURATE_SOURCE": str(source.absolute()),
        "DIFFCURATE_HYGIENE_CRON": cron,
        "DIFFCURATE_TIMEZONE": timezone,
        "DIFFCURATE_DASK_ADDRESS": dask_address,
    }


class ScheduleConfig(BaseModel):
    """One entry of a deployment's ``schedules`` (the ``prefect.yaml`` shape)."""

    model_config = ConfigDict(extra="forbid")

    cron: str | None = None
    interval: float | None = None
    rrule: str | None = None
    timezone: str | None = None
    anchor_date: str | None = None
    active: bool = True


class WorkPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    work_queue_name: str | None = None
    job_variables: dict[str, Any] = Field(default_factory=dict)


class DeploymentConfig(BaseModel):
    """One entry of ``deployments`` in ``prefect.yaml``: the fields diffcurate's file uses
    (anything else is refused rather than silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    entrypoint: str
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    work_pool: WorkPoolConfig
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    concurrency_limit: int | None = None
    paused: bool | None = None


def load_prefect_file(prefect_file: Path, env: dict[str, str]) -> list[DeploymentConfig]:
    """The deployments of ``prefect_file`` with its ``{{ $NAME }}`` variables filled from
    ``env`` (then the process environment), as ``prefect deploy`` would fill them."""
    import yaml
    from prefect.utilities.templating import apply_values

    raw = yaml.safe_load(prefect_file.read_text(encoding="utf-8"))
    if raw.get("pull") != [] or raw.get("build") or raw.get("push"):
        raise ValueError(f"{prefect_file}: diffcurate's deployments pull, build and push nothing")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        resolved = apply_values(raw["deployments"], {}, remove_notset=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    unresolved = sorted(set(re.findall(r"\{\{\s*\$?([A-Za-z0-9_]+)\s*\}\}", str(resolved))))
    if unresolved:
        raise ValueError(f"{prefect_file}: no value for {', '.join(unresolved)}")
    return [DeploymentConfig.model_validate(d) for d in resolved]


def apply(prefect_file: Path, env: dict[str, str], names: list[str] | None = None) -> list[str]:
    """Register the deployments of ``prefect_file`` (or those named ``FLOW/NAME`` in ``names``)
    on the Prefect server; returns their full names.

    This is what ``prefect deploy --all --prefect-file`` does for this file (module-path
    entrypoints, no pull steps), through the Python API: with the FastAPI this project pins,
    prefect 3.8.8's CLI stops after the first deployment, when it asks the server for the
    pool's workers with ``limit: null`` and gets a 422.
    """
    # prefect is imported here, not at module level: the CLI imports this module before it sets
    # PREFECT_HOME / PREFECT_LOGGING_LEVEL, which prefect reads once, on import.
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule
    from prefect.flows import load_flow_from_entrypoint
    from prefect.types.entrypoint import EntrypointType

    done = []
    for d in load_prefect_file(prefect_file, env):
        flow = load_flow_from_entrypoint(d.entrypoint, use_placeholder_flow=False)
        full_name = f"{flow.name}/{d.name}"
        if names and full_name not in names:
            continue
        schedules = [
            DeploymentScheduleCreate(
                schedule=construct_schedule(
                    cron=s.cron, interval=s.interval, rrule=s.rrule, timezone=s.timezone,
                    anchor_date=s.anchor_date,
                ),
                active=s.active,
            )
            for s in d.schedules
        ]  # fmt: skip
        deployment = flow.to_deployment(
            name=d.name, description=d.description, tags=d.tags, parameters=d.parameters,
            schedules=schedules, concurrency_limit=d.concurrency_limit, paused=d.paused,
            work_pool_name=d.work_pool.name, work_queue_name=d.work_pool.work_queue_name,
            job_variables=d.work_pool.job_variables, entrypoint_type=EntrypointType.MODULE_PATH,
        )  # fmt: skip
        if deployment.entrypoint != d.entrypoint:  # e.g. a flow re-exported under another name
            raise ValueError(f"entrypoint {d.entrypoint}: write it as {deployment.entrypoint}")
        deployment.apply()
        done.append(full_name)
    if names and (unknown := sorted(set(names) - set(done))):
        raise ValueError(f"no deployment {', '.join(unknown)} in {prefect_file}")
    return done


def hygiene_deployment(
    params: Any,
    *,
    name: str,
    cron: str | None = DEFAULT_CRON,
    interval: float | None = None,
    timezone: str = "UTC",
    work_pool: str | None = None,
) -> Any:
    """A scheduled deployment of the hygiene flow with ``params`` (a ``HygieneParams``), with a
    module-path entrypoint; at most one of its runs at a time."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from prefect.types.entrypoint import EntrypointType

    from diffcurate.flows.hygiene import hygiene_flow

    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron and interval")
    schedule = (
        IntervalSchedule(interval=interval, timezone=timezone)
        if interval is not None
        else CronSchedule(cron=cron, timezone=timezone)
    )
    return hygiene_flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"params": params.model_dump(mode="json")},
        concurrency_limit=1,
        tags=["diffcurate", "hygiene", params.dataset],
        description=f"Scheduled hygiene run of dataset {params.dataset!r}.",
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=work_pool,
    )
