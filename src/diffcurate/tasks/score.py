"""Scoring tasks: thin wrappers around :mod:`diffcurate.influence` and storage.

``score_shard`` is deterministic for a given shard (keyed draws, run-level state computed once
by ``prepare_scorer``), so a retry recomputes the same numbers; ``write_scores`` merges on
``run_id/sample_id`` and ``write_sketches`` on the sketch id, so a retried write adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from diffcurate.influence.objective import DiffusionObjective, ScoreResult
from diffcurate.influence.registry import (
    EmbeddingState,
    FitSet,
    RunState,
    ScorerSpec,
    fit_sample,
    prepare_state,
    score_function,
    score_keys,
    sketch_function,
)
from diffcurate.models.diffusion import DiffusionModel, ModelLoadError
from diffcurate.models.images import Geometry
from diffcurate.models.inputs import ModelInputs, load_inputs
from diffcurate.models.load_options import LoadOptions
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.sketches import SketchStore


class MissingEmbeddingsError(ValueError):
    """``clip-knn`` was asked to score a dataset ingested without CLIP embeddings."""


def load_model(
    path: Path, spec: ScorerSpec | None = None, options: LoadOptions | None = None
) -> DiffusionModel:
    """Load the model to score, refusing combinations that cannot be scored.

    A text-conditional UNet is scored on its samples' captions, embedded by the pipeline's own
    text encoder, so its directory must ship ``text_encoder/`` and ``tokenizer/``. Signals that
    are defined only for conditional models (``cond-gap``) refuse unconditional ones.
    ``options`` say how the checkpoint is held (variant, dtype, LoRA, single file).
    """
    model = (options or LoadOptions()).load(path)
    if model.conditional and model.text_encoder is None:
        raise ModelLoadError(
            f"{path} holds a text-conditional UNet but no text_encoder/ and tokenizer/: scoring "
            "embeds each sample's caption with the pipeline's own text encoder, so the model "
            "directory must include them (as a saved diffusers text-to-image pipeline does)"
        )
    if spec is not None and spec.scorer.needs.conditional and not model.conditional:
        raise ValueError(
            f"the {spec.signal} signal needs a text-conditional model; {path} holds an "
            "unconditional UNet"
        )
    return model


def pixel_shape(model: DiffusionModel) -> tuple[int, int]:
    """(channels, side) of the images the model is trained on (see :class:`ModelInputs`)."""
    inputs = ModelInputs.of(model)
    return inputs.pixel_channels, inputs.pixel_size


def scoring_objective(spec: ScorerSpec, model: DiffusionModel) -> DiffusionObjective:
    """The objective a shard is scored with. Inputs arrive already in diffusion space (cached
    VAE latents for latent models, :func:`load_images`), so the objective encodes nothing."""
    return spec.objective(model.scheduler, None)


def load_images(
    store: LanceStore,
    dataset: str,
    sample_ids: Sequence[str],
    model: DiffusionModel,
    geometry: Geometry = "center-crop",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``sample_ids``' inputs in diffusion space (pixels, or VAE latents from the latent cache)
    in that order, and for a text-conditional model their caption embeddings and the empty
    caption's."""
    prepared = load_inputs(store, dataset, model, list(sample_ids), geometry=geometry)
    cond = uncond = None
    if model.conditional:
        if model.text_encoder is None:
            raise ModelLoadError("a text-conditional model needs its text encoder to be scored")
        cond = model.text_encoder.encode([c or "" for c in prepared.captions])
        uncond = model.text_encoder.encode([""])
    return prepared.x0, cond, uncond


def load_embeddings(store: LanceStore, dataset: str, secrets: Sequence[str] = ()) -> EmbeddingState:
    """Every sample's CLIP image embedding (the ``clip-knn`` reference) and the secrets'.

    Raises:
        MissingEmbeddingsError: Some samples have no embedding, or they come from different
            CLIP models (cosines across models mean nothing).
    """
    table = store.read(
        "samples",
        dataset,
        columns=["sample_id", "key", "embedding_model", "image_embedding"],
    )
    rows = sorted(table.to_pylist(), key=lambda r: r["sample_id"])
    lacking = [r["sample_id"] for r in rows if not r["image_embedding"]]
    if lacking:
        raise MissingEmbeddingsError(
            f"clip-knn needs CLIP image embeddings, but {len(lacking)} of {len(rows)} samples "
            f"of {dataset!r} have none (e.g. {lacking[:3]}): configure clip.checkpoint "
            "(DIFFCURATE_CLIP__CHECKPOINT) and re-ingest the dataset"
        )
    models = {r["embedding_model"] for r in rows}
    if len(models) > 1:
        raise MissingEmbeddingsError(
            f"samples of {dataset!r} were embedded by different CLIP models {sorted(models)}; "
            "re-ingest them with one model"
        )
    reference = np.asarray([r["image_embedding"] for r in rows], dtype=np.float32)
    secret_rows = None
    if secrets:
        by_name = {r["sample_id"]: i for i, r in enumerate(rows)}
        by_name.update({r["key"]: i for i, r in enumerate(rows) if r["key"] not in by_name})
        missing = [s for s in secrets if s not in by_name]
        if missing:
            raise KeyError(f"secrets not found in {dataset!r}: {missing[:5]}")
        secret_rows = reference[[by_name[s] for s in secrets]]
    return EmbeddingState(
        reference_keys=tuple(r["sample_id"] for r in rows),
        reference=reference,
        secrets=secret_rows,
    )


@task(name="prepare-scorer", cache_policy=NO_CACHE)
def prepare_scorer(
    store: LanceStore,
    dataset: str,
    sample_ids: Sequence[str],
    model: DiffusionModel | None,
    spec: ScorerSpec,
    cache_dir: Path,
    geometry: Geometry = "center-crop",
) -> RunState:
    """The run's dataset-level state, computed once before the shards (see
    :func:`~diffcurate.influence.registry.prepare_state`): what the scorer ``needs``, loaded
    here: the fit set (a seeded sample of ``spec.fit_size`` of ``sample_ids``) with caches
    under ``cache_dir``, or the dataset's CLIP embeddings (and its secrets')."""
    needs = spec.scorer.needs
    fit = embeddings = None
    objective = None
    if needs.fit_set:
        assert model is not None
        fit_ids = fit_sample(sample_ids, spec.fit_size, spec.seed)
        images, cond, _ = load_images(store, dataset, fit_ids, model, geometry)
        fit = FitSet(images=images, keys=tuple(fit_ids), n_dataset=len(sample_ids), cond=cond)
        objective = scoring_objective(spec, model)
    if needs.embeddings:
        embeddings = load_embeddings(store, dataset, spec.scorer.secrets(spec))
    return prepare_state(
        spec, objective, None if model is None else model.unet, fit, cache_dir, embeddings
    )


@task(name="score-shard", cache_policy=NO_CACHE)
def score_shard(
    store: LanceStore,
    dataset: str,
    sample_ids: Sequence[str],
    model: DiffusionModel | None,
    spec: ScorerSpec,
    state: RunState | None = None,
    geometry: Geometry = "center-crop",
) -> ScoreResult:
    """Load one shard's images (in ``sample_ids`` order) and compute the signal on them.

    For a text-conditional model the captions are embedded with its text encoder (and the
    empty caption for signals that compare against the unconditional prediction). Model-free
    scorers (``needs.model`` False) read no images.
    """
    if not spec.uses_model:
        return score_keys(spec, list(sample_ids), state)
    assert model is not None
    images, cond, uncond = load_images(store, dataset, sample_ids, model, geometry)
    objective = scoring_objective(spec, model)
    return score_function(spec, state)(
        objective, model.unet, images, list(sample_ids), cond, uncond
    )


@task(name="sketch-shard", cache_policy=NO_CACHE)
def sketch_shard(
    store: LanceStore,
    dataset: str,
    sample_ids: Sequence[str],
    model: DiffusionModel,
    spec: ScorerSpec,
    geometry: Geometry = "center-crop",
) -> np.ndarray:
    """Sketch scorers (``dmin``): ``[n, T, v]`` sketches of one shard (``sample_ids`` order)."""
    images, cond, _ = load_images(store, dataset, sample_ids, model, geometry)
    objective = scoring_objective(spec, model)
    return sketch_function(spec)(objective, model.unet, images, list(sample_ids), cond)


@task(name="write-scores", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_scores(store: LanceStore, rows: pa.Table) -> int:
    return store.insert_new("scores", rows)


@task(name="write-sketches", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_sketches(
    sketches: SketchStore,
    run_id: str,
    dataset: str,
    sample_ids: Sequence[str],
    values: np.ndarray,
    timesteps: Sequence[int],
) -> int:
    return sketches.write(run_id, dataset, list(sample_ids), values, list(timesteps))
