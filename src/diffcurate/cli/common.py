"""What every command group shares: the consoles, settings loading, errors, shared options.

Heavy imports (torch, prefect, lancedb) happen inside the helpers that need them, so importing
the CLI stays instant.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from typer.core import TyperGroup

from diffcurate.config import Settings, apply_threads, load_settings
from diffcurate.storage.ledger_errors import LedgerError
from diffcurate.workspace import TablesLocationError

# soft_wrap: messages carry paths and ids that must stay copy-pastable; let terminals wrap.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# C0 and C1 control characters (ESC starts terminal escape sequences; CR rewrites a line) and
# the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SPACING = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def safe(value: Any) -> str:
    """``value`` as text that prints as itself on the consoles: rich markup escaped, control
    characters removed (tab, newline and carriage return become spaces).

    Every command passes data it did not write itself (captions, keys, ids, comments, names,
    paths, error messages quoting them) through this before printing it with markup on.
    """
    return escape(_CONTROL.sub("", str(value).translate(_SPACING)))


# How a checkpoint is held: every command that loads a model takes these.
VariantOpt = Annotated[
    str | None,
    typer.Option(
        help="Weights variant of every component, e.g. fp16 for *.fp16.safetensors "
        "[default: the plain weights, or the only variant present]."
    ),
]
LoadDTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Load the networks as float32 | float64 | float16 | bfloat16 (half precision "
        "needs --device cuda) [default: as saved].",
    ),
]
LoraOpt = Annotated[
    list[Path] | None,
    typer.Option("--lora", help="LoRA adapter (file or directory) fused at load; repeatable."),
]
LoraScaleOpt = Annotated[float, typer.Option(help="Multiplier of the LoRA updates.")]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        help="For a single-file checkpoint (--model x.safetensors): a local diffusers "
        "directory with the component configs and tokenizer (nothing is downloaded)."
    ),
]
GeometryOpt = Annotated[
    str,
    typer.Option(
        help="How images become the model's square input: center-crop | resize | pad "
        "(counts of cropped/upscaled images are reported)."
    ),
]
WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace directory: ledger, models, caches, and the LanceDB tables unless "
        "tables.uri puts them elsewhere (s3://...) [default: $DIFFCURATE_WORKSPACE or "
        "./workspace].",
        show_default=False,
    ),
]


DaskAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="--runner dask: scheduler of an existing cluster (tcp://host:8786) "
        "[default: a temporary local cluster]."
    ),
]
DaskWorkersOpt = Annotated[
    int, typer.Option(help="--runner dask: worker processes of the temporary cluster.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="torch/OpenMP threads of this command, its flow's tasks and its Dask workers "
        "[default: $DIFFCURATE_THREADS, an exported OMP_NUM_THREADS, else the CPUs this "
        "process may use].",
        show_default=False,
    ),
]


def workspace_settings(
    workspace: Path | None, threads: int | None = None, *, existing: bool = False
) -> Settings:
    """Load settings, create the workspace and set the process environment every command needs.

    Environment first, heavy imports later: Prefect reads ``PREFECT_HOME`` when it is imported.
    Invalid configuration exits 2 with the validation message; so does a workspace that does
    not exist when the command reads one (``existing``), instead of an empty one being created.
    ``threads`` (``--threads``) overrides the ``threads`` setting.
    """
    try:
        settings = load_settings(workspace)
    except (ValidationError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] invalid configuration:\n{e}")
        raise typer.Exit(2) from e
    if threads is not None:
        settings = settings.model_copy(update={"threads": threads})
    if existing and not settings.workspace.is_dir():
        raise fail(
            f"workspace {settings.workspace} does not exist (give --workspace, or ingest a "
            "dataset into it first: diffcurate ingest SOURCE --dataset NAME --workspace DIR)"
        )
    settings.workspace.mkdir(parents=True, exist_ok=True)
    try:
        settings.layout.bind_tables()
    except TablesLocationError as e:
        err.print(Text.assemble(("error:", "red"), " ", str(e)))
        raise typer.Exit(2) from e
    apply_threads(settings.threads)
    # Prefect's ephemeral mode keeps its state in PREFECT_HOME: keep it inside the workspace.
    os.environ.setdefault("PREFECT_HOME", str(settings.layout.prefect_home.resolve()))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral server's telemetry writer races the API for the SQLite lock.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its ephemeral server 20 s to start; a busy 2-core machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # diffusers warns on every dtype cast of a UNet ("modules ... kept in float32: []").
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    return settings


class CliGroup(TyperGroup):
    """A command group that reports a ledger it cannot use as one line on stderr, exit 2.

    Locked (after the retries), read-only or corrupt: each is a state of the workspace the
    user can act on, not a bug, so no command shows a traceback for it.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LedgerError as e:
            # Text, not markup: a path may hold "[...]".
            err.print(Text.assemble(("error:", "red"), " ", str(e)))
            raise typer.Exit(2) from e


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` (plain text, see :func:`safe`) as an error and return the exit to
    raise (2 = refused)."""
    err.print(f"[red]error:[/red] {safe(message)}")
    return typer.Exit(code)


def load_options(
    variant: str | None,
    dtype: str | None,
    lora: list[Path] | None,
    lora_scale: float,
    model_config: Path | None,
    device: str = "cpu",
):  # -> LoadOptions (imported lazily)
    """The loading options of the model flags, checked against the device."""
    from diffcurate.models.load_options import LoadOptions

    options = LoadOptions(
        variant=variant, dtype=dtype, lora=list(lora or []), lora_scale=lora_scale,
        config=model_config,
    )  # fmt: skip
    options.check_device(device)
    return options


def preflight(model: Path, options, device: str = "cpu"):  # -> DiffusionModel
    """Load the model before any flow starts: a bad checkpoint is one line, exit 2."""
    from diffcurate.models.errors import ModelLoadError
    from diffcurate.models.load_options import preflight as load_checked

    try:
        return load_checked(model, options, device)
    except (ModelLoadError, ValueError) as e:
        raise fail(str(e)) from e


def secret_list(value: str | None) -> list[str]:
    """Secrets from a JSON file (list or {"planted_keys": [...]}) or a comma-separated list."""
    if value is None:
        return []
    path = Path(value)
    if path.suffix == ".json" or path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("planted_keys", data.get("secrets"))
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{path}: expected a list of keys/ids or {{'planted_keys': [...]}}")
        return data
    return [v.strip() for v in value.split(",") if v.strip()]
