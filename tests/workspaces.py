"""Workspaces the flow tests share: ingested real digits and a saved tiny diffusers model.

Import as ``from workspaces import ...`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

from diffcurate.config import ClipSettings, IngestSettings
from diffcurate.demo.writers import SampleFile, write_manifest
from diffcurate.flows.ingest import IngestParams, ingest_flow
from tiny_unets import scheduler, tiny_unet


def ingest_samples(
    root: Path, samples: list[SampleFile], dataset: str = "digits", ws: Path | None = None
) -> Path:
    """Write ``samples`` as a parquet manifest under ``root`` and ingest them (no CLIP
    embeddings) as ``dataset`` into ``ws`` (default ``root/ws``); returns the workspace."""
    manifest = root / f"{dataset}.parquet"
    write_manifest(samples, manifest)
    ws = root / "ws" if ws is None else ws
    ingest_flow(
        IngestParams(source=manifest, dataset=dataset, workspace=ws, clip=ClipSettings(),
                     ingest=IngestSettings(), progress=False)
    )  # fmt: skip
    return ws


def save_tiny_unet_model(model_dir: Path) -> Path:
    """A diffusers model directory (``unet/`` float32 + ``scheduler/``) of the tiny test UNet."""
    tiny_unet().float().save_pretrained(model_dir / "unet")
    scheduler().save_pretrained(model_dir / "scheduler")
    return model_dir
