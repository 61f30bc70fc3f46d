"""Scoring tasks: thin wrappers around :mod:`diffcurate.influence` and storage.

``score_shard`` is deterministic for a given shard (keyed draws), so a retry recomputes the
same numbers; ``write_scores`` merges on ``run_id/sample_id`` so a retried write adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from diffcurate.influence.objective import ScoreResult
from diffcurate.influence.registry import ScorerSpec, score_function
from diffcurate.models.diffusion import DiffusionModel, load_diffusion_model
from diffcurate.models.images import decode_sample, prepare_image
from diffcurate.storage.lance_store import LanceStore


def load_model(path: Path) -> DiffusionModel:
    """Load the model to score, refusing what ``diffcurate score`` cannot condition yet."""
    model = load_diffusion_model(path)
    if model.conditional:
        raise ValueError(
            f"{path} holds a text-conditional UNet; `diffcurate score` needs caption embeddings "
            "for it, which the score flow does not compute yet (the influence API accepts them "
            "as `cond`)"
        )
    return model


def pixel_shape(model: DiffusionModel) -> tuple[int, int]:
    """(channels, side) of the images the model is trained on: its sample size in pixel space,
    or the latent size times the VAE's downsampling factor in latent space."""
    channels, side, _ = model.sample_shape
    if model.vae is None:
        return channels, side
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return int(model.vae.config.in_channels), side * factor


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(
    store: LanceStore,
    dataset: str,
    sample_ids: Sequence[str],
    model: DiffusionModel,
    spec: ScorerSpec,
) -> ScoreResult:
    """Load one shard's images (in ``sample_ids`` order) and compute the signal on them."""
    table = store.read(
        "samples", dataset, columns=["sample_id", "image"], where={"sample_id": list(sample_ids)}
    )
    by_id = dict(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist(),
                     strict=True))  # fmt: skip
    missing = [i for i in sample_ids if i not in by_id]
    if missing:
        raise KeyError(f"samples not found in {dataset!r}: {missing[:5]}")
    channels, size = pixel_shape(model)
    images = torch.from_numpy(
        np.stack([prepare_image(decode_sample(by_id[i], i), channels, size) for i in sample_ids])
    )
    objective = spec.objective(model.scheduler, model.vae)
    return score_function(spec)(objective, model.unet, images, list(sample_ids), None)


@task(name="write-scores", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_scores(store: LanceStore, rows: pa.Table) -> int:
    return store.insert_new("scores", rows)
