"""``diffcurate ingest``: decode, validate, hash, dedup and embed a corpus into LanceDB."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from diffcurate.cli.common import (
    DaskAddressOpt,
    DaskWorkersOpt,
    ThreadsOpt,
    WorkspaceOpt,
    err,
    fail,
    out,
    safe,
    workspace_settings,
)


def ingest(
    source: Annotated[
        Path, typer.Argument(help="Image folder, parquet/CSV manifest, or .tar shard(s).")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="auto | folder | manifest | webdataset.")
    ] = "auto",
    image_column: Annotated[
        str | None, typer.Option(help="Manifest column with image bytes or paths.")
    ] = None,
    caption_column: Annotated[str | None, typer.Option(help="Manifest caption column.")] = None,
    key_column: Annotated[
        str | None, typer.Option(help="Manifest column with sample keys.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Rows per shard (unit of commit and resume).")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Processes that decode and hash images (1: this one).")
    ] = 1,
    runner: Annotated[
        str,
        typer.Option(
            help="local: decode here (see --workers); dask: decode and hash as task runs on a "
            "Dask cluster (this process still writes every row)."
        ),
    ] = "local",
    dask_address: DaskAddressOpt = None,
    dask_workers: DaskWorkersOpt = 2,
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Ingest a corpus: decode, validate, hash, dedup, embed (if CLIP weights are configured).

    Re-running on the same source adds nothing; re-running after a crash completes it. Bad rows
    go to the `quarantine` table with a reason. Exits non-zero only when nothing could be
    ingested.
    """
    from diffcurate.ingest.sources import SourceError, SourceFormat, detect_format

    settings = workspace_settings(workspace, threads)
    try:
        fmt = SourceFormat(format)
    except ValueError:
        raise fail(
            f"unknown --format {format!r}; use one of {[f.value for f in SourceFormat]}"
        ) from None
    try:  # refuse an unusable source before starting any machinery
        detect_format(source) if fmt == SourceFormat.AUTO else source.stat()
    except (SourceError, OSError) as e:
        raise fail(f"cannot read source: {e}") from e
    ingest_cfg = settings.ingest
    if batch_size is not None:
        ingest_cfg = ingest_cfg.model_copy(update={"batch_size": batch_size})
    from diffcurate.flows.ingest import IngestParams, ingest_flow
    from diffcurate.flows.sharded import DaskOptions

    try:
        params = IngestParams(
            source=source,
            dataset=dataset,
            workspace=settings.workspace,
            format=fmt,
            image_column=image_column,
            caption_column=caption_column,
            key_column=key_column,
            clip=settings.clip,
            ingest=ingest_cfg,
            workers=workers,
            runner=runner,
            dask=DaskOptions(address=dask_address, n_workers=dask_workers),
        )
    except ValidationError as e:
        raise fail(str(e)) from e
    if not settings.clip.enabled:
        err.print(
            "[yellow]note:[/yellow] CLIP embeddings disabled (no clip.checkpoint configured); "
            "ingesting without embeddings."
        )
    try:
        summary = ingest_flow(params)
    except (SourceError, FileNotFoundError, ValueError) as e:
        raise fail(str(e)) from e
    _print_ingest_summary(summary)
    if summary.nothing_ingested:
        raise fail("nothing could be ingested from this source", code=1)


def _print_ingest_summary(summary) -> None:
    t = Table(title=f"ingest {summary.run_id}", show_header=False)
    t.add_row("dataset", safe(summary.dataset))
    t.add_row("source", safe(f"{summary.source} ({summary.format})"))
    t.add_row("records seen", str(summary.seen))
    t.add_row("ingested (new)", str(summary.ingested))
    t.add_row("already present", str(summary.already_present))
    t.add_row("quarantined", str(summary.quarantined))
    for reason, n in summary.quarantined_by_reason.items():
        t.add_row(safe(f"  {reason}"), str(n))
    d = summary.duplicates
    t.add_row(
        "exact duplicate groups",
        f"{d.get('exact_groups', 0)} groups, {d.get('exact_rows', 0)} samples",
    )
    t.add_row(
        "near duplicate groups",
        f"{d.get('near_groups', 0)} groups, {d.get('near_rows', 0)} samples",
    )
    t.add_row("embeddings", summary.embeddings)
    t.add_row("decoded by", f"{summary.workers} {summary.runner} worker(s)")
    if summary.lost_shards:
        t.add_row("shards lost with a worker", f"{summary.lost_shards} (decoded again)")
    t.add_row("samples in dataset", str(summary.dataset_samples))
    t.add_row("time", f"{summary.seconds:.1f} s")
    out.print(t)
