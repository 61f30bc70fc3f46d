"""What training a reference architecture on an ingested dataset consumes, for every arch.

Pixel-space archs (``digits-8px``, ``tiny``) train on pixels. The latent text-to-image arch
(``sd-tiny``) is trained in Stable Diffusion's two stages: first its VAE on the dataset's
pixels (:mod:`diffcurate.models.vae_train`), saved once as a complete pipeline directory
``base/`` next to the checkpoints so that a resumed run reuses the same autoencoder (new
weights would change every latent and so the UNet's data); then the UNet on the VAE's latents
(cached, :mod:`diffcurate.models.inputs`) with caption states from the frozen text encoder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcurate.models.diffusion import DiffusionModel, load_diffusion_model, save_diffusion_model
from diffcurate.models.images import Geometry, GeometryReport, load_training_images
from diffcurate.models.inputs import InputStore, ModelInputs
from diffcurate.models.lance_data import LanceTrainingData
from diffcurate.models.reference import SchedulerConfig, reference_model
from diffcurate.models.vae_train import VAEConfig, VAEResult, train_vae

BASE_DIR = "base"
"""Under a model's directory: the pipeline with the trained VAE the UNet is trained against."""


@dataclass
class ReferenceTraining:
    """A reference model and what its UNet trains on.

    Attributes:
        model: The model (for latent archs with the trained, frozen VAE).
        rows: Its training rows (pixels or VAE latents, and caption states for
            text-conditional archs), read from LanceDB one batch at a time.
        unconditional: The empty caption's states ``[1, seq, dim]`` or None.
        sample_ids: Row order of ``rows``.
        geometry: How many images were cropped, upscaled or padded.
        vae: The VAE stage's record when it ran in this call (None: pixel arch or reused).
    """

    model: DiffusionModel
    rows: LanceTrainingData
    unconditional: torch.Tensor | None
    sample_ids: list[str]
    geometry: GeometryReport
    vae: VAEResult | None = None


def _save_atomically(model: DiffusionModel, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_diffusion_model(model, tmp)
    os.replace(tmp, target)
    model.path = target


def prepare_reference_training(
    store: InputStore,
    dataset: str,
    arch: str,
    model_dir: Path,
    *,
    seed: int = 0,
    scheduler: SchedulerConfig | None = None,
    vae: VAEConfig | None = None,
    geometry: Geometry = "center-crop",
    progress: bool = False,
) -> ReferenceTraining:
    """Build ``arch``, train its VAE if it has one (once per ``model_dir``), load its inputs.

    Args:
        store: The workspace's LanceDB tables.
        dataset: The ingested dataset to train on.
        arch: A reference architecture name (see :func:`reference_model`).
        model_dir: ``WORKSPACE/models/NAME``; a latent arch's ``base/`` pipeline lives here.
        seed: Initialisation, VAE-stage and data seed.
        scheduler: The DDPM schedule.
        vae: The VAE stage's settings (latent archs); defaults of :class:`VAEConfig`.
        geometry: How non-square images become the model's square input.
        progress: Progress output of the VAE stage.
    """
    model = reference_model(arch, seed, scheduler)
    vae_result = None
    if model.vae is not None:
        base = model_dir / BASE_DIR
        if base.is_dir():
            model = load_diffusion_model(base)
        else:
            inputs = ModelInputs.of(model, geometry)
            pixels = load_training_images(
                store, dataset, channels=inputs.pixel_channels, size=inputs.pixel_size,
                geometry=geometry,
            ).pixels  # fmt: skip
            config = vae or VAEConfig(seed=seed)
            vae_result = train_vae(model.vae, pixels, config, progress=progress)
            model.vae.eval().requires_grad_(False)
            model_dir.mkdir(parents=True, exist_ok=True)
            _save_atomically(model, base)
    rows = LanceTrainingData(store, dataset, model, None, geometry=geometry)
    uncond = None
    if model.conditional:
        if model.text_encoder is None:
            raise ValueError(f"reference architecture {arch!r} has no text encoder")
        uncond = model.text_encoder.encode([""])
    return ReferenceTraining(
        model=model, rows=rows, unconditional=uncond, sample_ids=list(rows.sample_ids),
        geometry=rows.geometry, vae=vae_result,
    )  # fmt: skip
