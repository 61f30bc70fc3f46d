"""``diffcurate deploy``: Prefect work pools, deployments and schedules for running at scale.

Every subcommand talks to the Prefect server named by ``PREFECT_API_URL`` (a deployment in
Prefect's ephemeral mode would vanish with the process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from diffcurate.cli.common import fail, out, safe
from diffcurate.deployments import DEFAULT_CRON, DEFAULT_DASK_ADDRESS, DEFAULT_PREFECT_FILE

deploy_app = typer.Typer(
    help="Schedule diffcurate on a Prefect server: work pools, deployments, served schedules.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

GpuSlotsOpt = Annotated[
    int | None,
    typer.Option(
        help="Tag concurrency limit `gpu`: GPU task runs at once across all workers (set it to "
        "the number of GPUs) [default: unchanged]."
    ),
]
GpuRunsOpt = Annotated[
    int | None, typer.Option(help="Flow runs at once on the `gpu` pool [default: unlimited].")
]


def _require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise fail(
            "PREFECT_API_URL is not set: point it at your Prefect server "
            "(e.g. http://127.0.0.1:4200/api after `prefect server start`)"
        )
    return str(url)


def _workspace(workspace: Path | None) -> Path:
    from diffcurate.config import load_settings

    try:
        ws = load_settings(workspace).workspace
    except (ValidationError, FileNotFoundError) as e:
        raise fail(f"invalid configuration:\n{e}") from e
    return ws.absolute()


@deploy_app.command("pools")
def pools(gpu_slots: GpuSlotsOpt = None, gpu_runs: GpuRunsOpt = None) -> None:
    """Create or update the `cpu` and `gpu` work pools (process type) and the `gpu` limit."""
    from diffcurate.deployments import ensure_pools

    url = _require_server()
    for line in ensure_pools(gpu_slots=gpu_slots, gpu_runs=gpu_runs):
        out.print(safe(f"{url}: {line}"))


@deploy_app.command("apply")
def apply_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset of the deployments.")],
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Model directory, as the workers see it.")
    ],
    prefect_file: Annotated[
        Path, typer.Option(help="The deployments file.")
    ] = DEFAULT_PREFECT_FILE,
    cron: Annotated[str, typer.Option(help="Hygiene schedule (cron).")] = DEFAULT_CRON,
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    dask_address: Annotated[
        str, typer.Option(help="Dask scheduler of the sharded-scoring cluster.")
    ] = DEFAULT_DASK_ADDRESS,
    source: Annotated[
        Path | None,
        typer.Option(help="What the ingest deployment ingests [default: /data/incoming/DATASET]."),
    ] = None,
    name: Annotated[
        list[str] | None,
        typer.Option(help="Only this deployment, FLOW/NAME (repeatable) [default: all]."),
    ] = None,
    gpu_slots: GpuSlotsOpt = None,
    gpu_runs: GpuRunsOpt = None,
    workspace: Annotated[
        Path | None,
        typer.Option("--workspace", "-w", help="Workspace, as the workers see it (shared)."),
    ] = None,
) -> None:
    """Create the work pools and the `gpu` limit, then register every deployment of
    `infra/prefect.yaml` (ingest, sharded score, nightly hygiene) with its variables filled in.
    Start workers with `prefect worker start --pool gpu` (see infra/compose.yaml)."""
    from diffcurate.deployments import apply, deploy_env, ensure_pools

    url = _require_server()
    if not prefect_file.is_file():
        raise fail(f"deployments file not found: {prefect_file} (run from the project root, "
                    "or pass --prefect-file)")  # fmt: skip
    try:
        env = deploy_env(
            dataset=dataset, model=model, workspace=_workspace(workspace), cron=cron,
            dask_address=dask_address, source=source, timezone=timezone,
        )  # fmt: skip
    except ValueError as e:
        raise fail(str(e)) from e
    for line in ensure_pools(gpu_slots=gpu_slots, gpu_runs=gpu_runs):
        out.print(safe(f"{url}: {line}"))
    try:
        names = apply(prefect_file, env, name)
    except (ValueError, ImportError, OSError) as e:
        raise fail(str(e)) from e
    for full_name in names:
        out.print(safe(f"{url}: deployment {full_name!r}"))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@deploy_app.command("serve")
def serve_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to clean.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    cron: Annotated[
        str | None, typer.Option(help=f"Schedule (cron) [default: {DEFAULT_CRON}].")
    ] = None,
    interval: Annotated[
        float | None, typer.Option(help="Schedule every this many seconds (instead of cron).")
    ] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the schedule.")] = "UTC",
    name: Annotated[
        str | None, typer.Option(help="Deployment name [default: DATASET-nightly].")
    ] = None,
    scorer: Annotated[str, typer.Option("--scorer", "-s", help="Risk signal.")] = "divergence",
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    params: Annotated[
        Path | None,
        typer.Option(
            help="JSON file of further hygiene parameters (fields of HygieneParams, nested: "
            '{"measure": {"generations": 64}}), merged over the options.'
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Runs executed at once by this process.")] = 1,
    workspace: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")
    ] = None,
) -> None:
    """Serve a scheduled hygiene deployment from this process until interrupted: registers
    `hygiene/NAME` with its schedule on the server and executes its runs (no work pool needed).
    """
    from prefect import serve

    from diffcurate.deployments import hygiene_deployment
    from diffcurate.flows.hygiene import HygieneParams

    url = _require_server()
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if cron is not None and interval is not None:
        raise fail("give --cron or --interval, not both")
    ws = _workspace(workspace)
    base: dict[str, Any] = {
        "dataset": dataset, "model": str(model.absolute()), "workspace": str(ws),
        "scorer": {"signal": scorer, "device": device}, "mitigation": {"device": device},
        "measure": {"device": device}, "progress": False,
    }  # fmt: skip
    try:
        if params is not None:
            base = _merge(base, json.loads(params.read_text(encoding="utf-8")))
        hygiene = HygieneParams.model_validate(base)
        deployment = hygiene_deployment(
            hygiene, name=name or f"{dataset}-nightly", interval=interval, timezone=timezone,
            cron=None if interval is not None else (cron or DEFAULT_CRON),
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise fail(str(e)) from e
    out.print(safe(f"serving hygiene/{deployment.name} on {url}"))
    serve(deployment, limit=limit, print_starting_message=True)
