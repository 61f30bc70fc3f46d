"""The ingest flow: source → decode + validate → embed → LanceDB, with a ledger record.

Steps:
    1. Open the source (refused as a whole only if nothing in it is readable).
    2. Record the run in the ledger; mark earlier runs whose process died as interrupted.
    3. Load the CLIP embedder from local files, or say clearly that embeddings are disabled.
    4. For each shard of ``batch_size`` records: prepare (decode, validate, embed) and commit.
       Commits are idempotent merges, so a killed run re-run completes with no duplicates.
       Decoding and hashing fan out to ``workers`` processes, or to a Dask cluster
       (``runner="dask"``), a few shards ahead; the flow's process consumes them in source
       order and is the only writer, so the rows do not depend on who decoded.
    5. Recompute the dataset's duplicate groups.
    6. Close the run in the ledger with its statistics.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.config import ClipSettings, IngestSettings
from diffcurate.flows.progress import progress_bar
from diffcurate.flows.sharded import DaskOptions, dask_task_runner
from diffcurate.ingest.pool import Decoder, InProcessDecoder, ProcessPoolDecoder
from diffcurate.ingest.shard import images_to_decode
from diffcurate.ingest.sources import SourceFormat, open_source
from diffcurate.models.clip_embedder import ClipEmbedder
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.validation import SampleBatchValidator
from diffcurate.tasks.ingest import dedup, prepare_shard_task, write_shard
from diffcurate.workspace import Workspace

T = TypeVar("T")


class IngestParams(BaseModel):
    """Parameters of one ingest run (everything a deployment needs; JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    source: Path = Field(description="Folder, manifest file, or tar shard(s) to ingest.")
    dataset: DatasetName = Field(description="Dataset name; part of every sample id.")
    workspace: Path = Field(Path("workspace"), description="Workspace directory.")
    format: SourceFormat = SourceFormat.AUTO
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    clip: ClipSettings = Field(default_factory=ClipSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    progress: bool = Field(True, description="Show a progress bar when stderr is a terminal.")
    workers: int = Field(
        1, ge=1, description="local runner: processes decoding and hashing (1: the flow's own)."
    )
    runner: Literal["local", "dask"] = Field(
        "local", description="dask: shards are decoded and hashed as task runs on a Dask cluster."
    )
    dask: DaskOptions = Field(default_factory=DaskOptions)


class IngestSummary(BaseModel):
    """What an ingest run did; also stored as the run's ``stats`` in the ledger."""

    run_id: str
    dataset: str
    source: str
    format: str
    seen: int = 0
    ingested: int = 0
    already_present: int = 0
    quarantined: int = 0
    quarantine_new: int = 0
    quarantined_by_reason: dict[str, int] = Field(default_factory=dict)
    embeddings: str = "disabled"
    duplicates: dict[str, int] = Field(default_factory=dict)
    dataset_samples: int = 0
    runner: str = "local"
    workers: int = Field(1, description="Decoding processes (dask: distinct workers that did).")
    lost_shards: int = Field(0, description="dask: decode task runs lost with their worker.")
    seconds: float = 0.0

    @property
    def nothing_ingested(self) -> bool:
        """True when the source yielded no usable sample at all (new or already stored)."""
        return self.ingested + self.already_present == 0


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _decoder(params: IngestParams, stack: contextlib.ExitStack, log: Any) -> Decoder:
    """The decoder the parameters ask for, its resources owned by ``stack``."""
    max_pixels = params.ingest.max_pixels
    if params.runner == "dask":
        from diffcurate.flows.ingest_dask import DaskDecoder

        runner = stack.enter_context(dask_task_runner(params.dask))
        in_flight = max(2 * len(runner.client.scheduler_info()["workers"]), 4)
        return DaskDecoder(runner, max_pixels, in_flight=in_flight, log=log)
    if params.workers > 1:
        return stack.enter_context(ProcessPoolDecoder(params.workers, max_pixels))
    return InProcessDecoder()


@flow(name="ingest", validate_parameters=True)
def ingest_flow(params: IngestParams) -> IngestSummary:
    """Ingest an image–caption source into the workspace's ``samples`` table."""
    log = get_run_logger()
    started = time.perf_counter()
    dataset = params.dataset
    # 1. Open the source.
    source = open_source(
        params.source,
        params.format,
        image_column=params.image_column,
        caption_column=params.caption_column,
        key_column=params.key_column,
    )
    workspace = Workspace(params.workspace)
    store = LanceStore.open(workspace)
    ledger = Ledger(workspace.ledger_path)
    # 2. Ledger (step 6 closes the run when the block ends).
    for stale in ledger.mark_interrupted():
        log.warning("run %s died before finishing; marked interrupted", stale)
    with ledger.recording(
        "ingest", dataset=dataset, source=str(params.source), params=params.model_dump(mode="json")
    ) as run:
        run_id = run.run_id
        summary = IngestSummary(
            run_id=run_id, dataset=dataset, source=str(params.source), format=source.format_name
        )
        run.stats = summary.model_dump
        # 3. Embedder.
        embedder = None
        if params.clip.enabled:
            embedder = ClipEmbedder(params.clip)
            summary.embeddings = embedder.name
        else:
            log.warning(
                "CLIP embeddings are DISABLED: no clip.checkpoint configured. Samples are "
                "ingested without embeddings; near-duplicates use perceptual hashes only."
            )
        validator = SampleBatchValidator(params.ingest)
        existing = store.read("samples", dataset=dataset, columns=["sample_id", "sha256"])
        known = dict(
            zip(
                existing.column("sample_id").to_pylist(),
                existing.column("sha256").to_pylist(),
                strict=True,
            )
        )
        claimed: set[str] = set()
        reasons: Counter[str] = Counter()
        try:
            total = len(source)
        except TypeError:
            total = None
        # 4. Shards.
        with (
            contextlib.ExitStack() as stack,
            progress_bar("ingest", params.progress, with_status=True) as bar,
        ):
            decoder = _decoder(params, stack, log)
            shards = (
                (records, images_to_decode(records, dataset, known))
                for records in _chunks(source, params.ingest.batch_size)
            )
            task_id = bar.add_task("ingest", total=total, status="")
            for shard_no, (records, decoded) in enumerate(decoder.map(shards)):
                # quote(): Prefect otherwise walks every element of every task argument on
                # each call, which makes the growing id maps cost O(corpus) per shard.
                result = prepare_shard_task(
                    quote(records),
                    dataset=dataset,
                    run_id=run_id,
                    known=quote(known),
                    claimed_this_run=quote(claimed),
                    cfg=params.ingest,
                    validator=quote(validator),
                    embedder=quote(embedder),
                    decoded=quote(decoded),
                )
                new_samples, new_quarantine = write_shard(store, quote(result))
                claimed.update(result.claimed)
                reasons.update(result.reasons)
                summary.seen += result.seen
                summary.ingested += new_samples
                summary.already_present += result.already_present
                summary.quarantined += result.quarantine.num_rows
                summary.quarantine_new += new_quarantine
                bar.update(
                    task_id,
                    advance=len(records),
                    status=f"{summary.ingested} new, {summary.quarantined} quarantined",
                )
                log.info(
                    "shard %d: %d records, %d new samples, %d quarantined",
                    shard_no,
                    len(records),
                    new_samples,
                    result.quarantine.num_rows,
                )
            summary.runner, summary.workers = params.runner, params.workers
            if params.runner == "dask":
                summary.workers = len(decoder.workers)  # type: ignore[attr-defined]
                summary.lost_shards = decoder.lost  # type: ignore[attr-defined]
        summary.quarantined_by_reason = dict(sorted(reasons.items()))
        # 5. Duplicate groups.
        groups = dedup(
            store,
            dataset,
            run_id,
            params.ingest.phash_max_distance,
            params.ingest.clip_dup_threshold,
        )
        summary.duplicates = groups.summary()
        summary.dataset_samples = store.count("samples", dataset)
        summary.seconds = round(time.perf_counter() - started, 3)
    log.info("ingest %s: %s", run_id, summary.model_dump_json())
    return summary
