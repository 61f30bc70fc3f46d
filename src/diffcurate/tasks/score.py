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
from diffcurate.influence.registry import CONDITIONAL_ONLY, ScorerSpec, score_function
from diffcurate.models.diffusion import DiffusionModel, ModelLoadError, load_diffusion_model
from diffcurate.models.images import decode_sample, prepare_image
from diffcurate.storage.lance_store import LanceStore


def load_model(path: Path, spec: ScorerSpec | None = None) -> DiffusionModel:
    """Load the model to score, refusing combinations that cannot be scored.

    A text-conditional UNet is scored on its samples' captions, embedded by the pipeline's own
    text encoder, so its directory must ship ``text_encoder/`` and ``tokenizer/``. Signals that
    are defined only for conditional models (``cond-gap``) refuse unconditional ones.
    """
    model = load_diffusion_model(path)
    if model.conditional and model.text_encoder is None:
        raise ModelLoadError(
            f"{path} holds a text-conditional UNet but no text_encoder/ and tokenizer/: scoring "
            "embeds each sample's caption with the pipeline's own text encoder, so the model "
            "directory must include them (as a saved diffusers text-to-image pipeline does)"
        )
    if spec is not None and spec.signal in CONDITIONAL_ONLY and not model.conditional:
        raise ValueError(
            f"the {spec.signal} signal needs a text-conditional model; {path} holds an "
            "unconditional UNet"
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
    """Load one shard's images (in ``sample_ids`` order) and compute the signal on them.

    For a text-conditional model the captions are embedded with its text encoder (and the
    empty caption for signals that compare against the unconditional prediction).
    """
    table = store.read(
        "samples",
        dataset,
        columns=["sample_id", "image", "caption"],
        where={"sample_id": list(sample_ids)},
    )
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    missing = [i for i in sample_ids if i not in rows]
    if missing:
        raise KeyError(f"samples not found in {dataset!r}: {missing[:5]}")
    channels, size = pixel_shape(model)
    images = torch.from_numpy(
        np.stack(
            [prepare_image(decode_sample(rows[i]["image"], i), channels, size) for i in sample_ids]
        )
    )
    cond = uncond = None
    if model.conditional:
        if model.text_encoder is None:
            raise ModelLoadError("a text-conditional model needs its text encoder to be scored")
        cond = model.text_encoder.encode([rows[i]["caption"] or "" for i in sample_ids])
        uncond = model.text_encoder.encode([""])
    objective = spec.objective(model.scheduler, model.vae)
    return score_function(spec)(objective, model.unet, images, list(sample_ids), cond, uncond)


@task(name="write-scores", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_scores(store: LanceStore, rows: pa.Table) -> int:
    return store.insert_new("scores", rows)
