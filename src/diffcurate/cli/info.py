"""Read-only views of a workspace: ``runs``, ``scores``, ``quarantine``, ``datasets`` and
``config``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from diffcurate.cli.common import WorkspaceOpt, out, safe, workspace_settings
from diffcurate.cli.score import print_top_scores


def scores(
    run_id: Annotated[str, typer.Argument(help="A score run id (see `diffcurate runs`).")],
    top: Annotated[int, typer.Option(help="Riskiest samples to print.")] = 20,
    workspace: WorkspaceOpt = None,
) -> None:
    """Print the riskiest samples of a scoring run."""
    print_top_scores(workspace_settings(workspace), run_id, top)


def runs(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (ingest, score, ...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """List runs recorded in the ledger, newest first."""
    from diffcurate.storage.ledger import Ledger

    settings = workspace_settings(workspace)
    rows = Ledger(settings.layout.ledger_path).runs(kind=kind, dataset=dataset)
    if as_json:
        # Python-mode dumps with str() for datetimes: the shape `runs --json` always printed.
        out.print_json(json.dumps([r.model_dump() for r in rows], default=str))
        return
    t = Table("run_id", "kind", "dataset", "status", "started", "seconds", "rows", "quarantined")
    for r in rows:
        s = r.stats
        t.add_row(
            safe(r.run_id),
            safe(r.kind),
            safe(r.dataset or ""),
            safe(r.status),
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            "" if r.seconds is None else f"{r.seconds:.1f}",
            str(s.get("ingested", "")),
            str(s.get("quarantined", "")),
        )
    out.print(t)


def quarantine(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
    workspace: WorkspaceOpt = None,
) -> None:
    """Show quarantined rows with their reasons (counts per reason first)."""
    from collections import Counter

    from diffcurate.storage.lance_store import LanceStore

    settings = workspace_settings(workspace)
    store = LanceStore.open(settings.layout)
    table = store.read(
        "quarantine", dataset=dataset, columns=["dataset", "key", "source", "reason", "detail"]
    ).to_pylist()
    if reason is not None:
        table = [r for r in table if r["reason"] == reason]
    counts = Counter(r["reason"] for r in table)
    out.print(safe(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
              or "quarantine is empty")  # fmt: skip
    t = Table("dataset", "key", "reason", "detail", "source")
    for r in table[:limit]:
        t.add_row(*(safe(r[c] or "") for c in ("dataset", "key", "reason", "detail", "source")))
    if table:
        out.print(t)


def datasets(workspace: WorkspaceOpt = None) -> None:
    """Datasets in the workspace with sample, quarantine and duplicate counts."""
    from collections import Counter

    from diffcurate.storage.lance_store import LanceStore

    settings = workspace_settings(workspace)
    store = LanceStore.open(settings.layout)
    samples = Counter(store.read("samples", columns=["dataset"]).column("dataset").to_pylist())
    quarantined = Counter(
        store.read("quarantine", columns=["dataset"]).column("dataset").to_pylist()
    )
    dups = store.read("duplicates", columns=["dataset", "exact_group_size"]).to_pylist()
    in_dup = Counter(r["dataset"] for r in dups if r["exact_group_size"] > 1)
    t = Table("dataset", "samples", "quarantined", "in exact-duplicate groups")
    for name in sorted(set(samples) | set(quarantined)):
        t.add_row(safe(name), str(samples[name]), str(quarantined[name]), str(in_dup[name]))
    out.print(t)
    out.print(f"tables: {safe(store.uri)}")


def config(workspace: WorkspaceOpt = None) -> None:
    """Print the effective configuration (after environment and diffcurate.toml)."""
    settings = workspace_settings(workspace)
    out.print_json(settings.model_dump_json())
