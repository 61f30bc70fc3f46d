"""Measure one model for the gates: Mem% on the secret set and utility against real images.

Memorization (Carlini et al. 2023's extraction test, scaled down): generate images and count a
secret as *reconstructed* when some generation lies within τ of it
(:mod:`diffcurate.metrics.memorization`). Unconditional models are sampled ``generations``
times and every generation is compared with every secret; text-conditional models are prompted
with each secret's own caption ``generations_per_secret`` times, and a generation only counts
for the secret it was prompted with.

Utility: Fréchet distance and KID between features of generations and of real reference images
(:mod:`diffcurate.metrics.utility`). Both models of a gate are sampled from the same keyed
initial noises (``seed``), so before/after differences come from the weights, not the draws.

τ is either fixed (``memorization.threshold`` or the metric's default) or, with
``calibrate_fpr``, calibrated on the measured model's own generations so that at most that
share of calibration images (held-out real images where available) would count as
reconstructed (:mod:`diffcurate.metrics.mem_calibration`; seed 000's rule). The gate calibrates
on the model before mitigation and passes that τ to the candidate's measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.metrics.mem_calibration import Calibration, calibrate_threshold
from diffcurate.metrics.memorization import MemorizationPolicy, MemResult, mem_percent
from diffcurate.metrics.utility import (
    KIDResult,
    PixelFeatureConfig,
    frechet_distance,
    kernel_inception_distance,
    pixel_features,
)
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.sample import generate


class MeasureConfig(BaseModel):
    """How a model is sampled and compared for the gates.

    Attributes:
        generations: Unconditional samples per model (also the utility sample size).
        generations_per_secret: Conditional models: samples per secret caption.
        inference_steps: DDIM steps per sample.
        seed: Keyed initial noises (identical for the before and after models).
        memorization: Reconstruction metric and threshold τ.
        calibrate_fpr: If set, τ is calibrated to this false-positive rate on calibration
            images instead of taken from ``memorization`` (see the module docstring).
        calibration_size: At most this many calibration images are used.
        features: Feature extractor for FD/KID.
        kid_subsets: KID subsets.
        kid_subset_size: Rows per KID subset.
        device: ``cpu`` or ``cuda``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    generations: int = Field(256, ge=2)
    generations_per_secret: int = Field(8, ge=1)
    inference_steps: int = Field(50, ge=1)
    seed: int = 0
    memorization: MemorizationPolicy = Field(default_factory=MemorizationPolicy)
    calibrate_fpr: float | None = Field(None, gt=0.0, le=0.5)
    calibration_size: int = Field(1000, ge=1)
    features: PixelFeatureConfig = Field(default_factory=PixelFeatureConfig)
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(100, ge=2)
    device: str = "cpu"


class ModelMeasurement(BaseModel):
    """Mem%, FD and KID of one model."""

    model_config = ConfigDict(frozen=True)

    mem: MemResult
    fd: float
    kid: KIDResult
    n_generated: int
    n_reference: int
    calibration: Calibration | None = None


def to_unit(images: torch.Tensor) -> np.ndarray:
    """``[n, C, H, W]`` in [-1, 1] → ``[n, H, W, C]`` float64 in [0, 1] (the metrics' input)."""
    return ((images.double().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def measure_model(
    model: DiffusionModel,
    secrets: torch.Tensor,
    secret_ids: list[str],
    reference: torch.Tensor,
    config: MeasureConfig | None = None,
    secret_conditioning: torch.Tensor | None = None,
    reference_conditioning: torch.Tensor | None = None,
    save_closest_to: Path | None = None,
    *,
    tau: float | None = None,
    calibration_images: torch.Tensor | None = None,
    calibration_conditioning: torch.Tensor | None = None,
) -> ModelMeasurement:
    """Sample ``model`` and measure memorization of ``secrets`` and utility vs ``reference``.

    Args:
        model: The model to measure.
        secrets: ``[S, C, H, W]`` secret/canary images in [-1, 1].
        secret_ids: One id per secret.
        reference: ``[R, C, H, W]`` real images in [-1, 1] for FD/KID.
        config: Sampling and metric settings.
        secret_conditioning: Conditional models: caption embeddings ``[S, seq, dim]``.
        reference_conditioning: Conditional models: embeddings of captions to sample the
            utility set from ``[m, seq, dim]`` (cycled to ``generations`` rows).
        save_closest_to: If given, each secret's closest generation is written there as
            ``<secret_id>.png`` (for reviewers: the near-copy beside its training image).
        tau: Use this τ (e.g. one calibrated on the model before mitigation); overrides both
            ``memorization.threshold`` and ``calibrate_fpr``.
        calibration_images: ``[n, C, H, W]`` in [-1, 1]: required when ``calibrate_fpr`` is set
            and ``tau`` is not (the first ``calibration_size`` are used).
        calibration_conditioning: Conditional models: their caption embeddings; each image is
            then generated for ``generations_per_secret`` times from its own caption.
    """
    config = config or MeasureConfig()
    steps, dev = config.inference_steps, config.device
    if model.conditional:
        if secret_conditioning is None or reference_conditioning is None:
            raise ValueError("a text-conditional model is measured from caption embeddings")
        k = config.generations_per_secret
        cond = secret_conditioning.repeat_interleave(k, dim=0)
        mem_gens = generate(model, len(cond), seed=config.seed, num_inference_steps=steps,
                            conditioning=cond, device=dev)  # fmt: skip
        generated_for = [sid for sid in secret_ids for _ in range(k)]
        idx = torch.arange(config.generations) % len(reference_conditioning)
        util_gens = generate(model, config.generations, seed=config.seed + 1,
                             num_inference_steps=steps, conditioning=reference_conditioning[idx],
                             device=dev)  # fmt: skip
    else:
        util_gens = generate(model, config.generations, seed=config.seed,
                             num_inference_steps=steps, device=dev)  # fmt: skip
        mem_gens, generated_for = util_gens, None
    policy, calibration = config.memorization, None
    if tau is not None:
        policy = policy.model_copy(update={"threshold": tau})
    elif config.calibrate_fpr is not None:
        calibration = _calibrate(model, config, mem_gens, calibration_images,
                                 calibration_conditioning)  # fmt: skip
        policy = policy.model_copy(update={"threshold": calibration.tau})
    mem = mem_percent(
        to_unit(mem_gens),
        to_unit(secrets),
        policy=policy,
        secret_ids=secret_ids,
        generated_for=generated_for,
    )
    if save_closest_to is not None:
        save_closest(mem_gens, mem, save_closest_to)
    fake = pixel_features(to_unit(util_gens), config.features)
    real = pixel_features(to_unit(reference), config.features)
    kid = kernel_inception_distance(
        fake, real, subsets=config.kid_subsets, subset_size=config.kid_subset_size,
        seed=config.seed,
    )  # fmt: skip
    return ModelMeasurement(
        mem=mem,
        fd=frechet_distance(fake, real),
        kid=kid,
        n_generated=len(util_gens),
        n_reference=len(reference),
        calibration=calibration,
    )


def _calibrate(
    model: DiffusionModel,
    config: MeasureConfig,
    mem_gens: torch.Tensor,
    images: torch.Tensor | None,
    conditioning: torch.Tensor | None,
) -> Calibration:
    """τ at ``config.calibrate_fpr`` from the model's generations vs calibration images."""
    if images is None or len(images) == 0:
        raise ValueError("calibrate_fpr needs calibration images (held-out or kept images)")
    images = images[: config.calibration_size]
    owners = None
    gens = mem_gens  # unconditional: the same generations the secrets are compared with
    if model.conditional:
        if conditioning is None:
            raise ValueError("a text-conditional model is calibrated from caption embeddings")
        k = config.generations_per_secret
        cond = conditioning[: len(images)].repeat_interleave(k, dim=0)
        gens = generate(model, len(cond), seed=config.seed + 2,
                        num_inference_steps=config.inference_steps, conditioning=cond,
                        device=config.device)  # fmt: skip
        owners = np.repeat(np.arange(len(images)), k).tolist()
    return calibrate_threshold(to_unit(gens), to_unit(images), config.memorization,
                               config.calibrate_fpr, owners)  # fmt: skip


def save_closest(generations: torch.Tensor, mem: MemResult, out_dir: Path) -> None:
    """Write each secret's closest generation as an 8-bit PNG named by the secret id."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.round(to_unit(generations) * 255).astype(np.uint8)
    for match in mem.secrets:
        if match.best_generation is None:
            continue
        img = pixels[match.best_generation]
        mode_img = img[..., 0] if img.shape[-1] == 1 else img
        Image.fromarray(mode_img).save(out_dir / f"{match.secret_id}.png")
