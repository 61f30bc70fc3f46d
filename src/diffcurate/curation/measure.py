"""Measure one model for the gates: Mem% on the secret set and utility against real images.

Memorization (Carlini et al. 2023's extraction test, scaled down): generate images and count a
secret as *reconstructed* when some generation lies within τ of it
(:mod:`diffcurate.metrics.memorization`). Unconditional models are sampled ``generations``
times and every generation is compared with every secret; text-conditional models are prompted
with each secret's own caption ``generations_per_secret`` times, and a generation only counts
for the secret it was prompted with. Secrets must be distinct (one id, one caption each): a
secret duplicated in the training set is measured once, not once per copy.

Text-conditional models are sampled with classifier-free guidance (``guidance_scale``, 7.5 by
default as in Stable Diffusion; needs the empty caption's states, ``unconditional``), because
that is how they are used and a caption-prompted model may reproduce a training image only under
guidance. Pixel-space unconditional models ignore the scale.

Which rule (``MeasureConfig.rule`` picks the family, ``MeasureConfig.memorization`` the base
distance and threshold); ``auto``, the default, applies the rule below by model class:

* pixel-space models at the scale of the bundled 8×8 digits: ``tiled_l2`` with τ = 0.08 (the
  global default) or a τ calibrated on held-out images;
* latent text-to-image models (VAE decoder): ``relative_tiled_l2`` with ``neighbours`` = the
  training images and, per secret, its copies among them excluded. A VAE's reconstruction floor
  (every decoded generation is blurred; on sd-tiny a reproduced secret's closest generation lies
  0.03-0.15 tiled L2 away, depending on the VAE and the secret) can lie above a τ tuned on
  digits, so an absolute rule can read 0 there; the relative distance
  divides by the generation's distance to its nearest training images, which the floor lifts
  too. δ is 0.8 by default, better calibrated on held-out images (``calibrate_fpr``).

Utility: Fréchet distance and KID between features of generations and of real reference images
(:mod:`diffcurate.metrics.utility`). Both models of a gate are sampled from the same keyed
initial noises (``seed``), so before/after differences come from the weights, not the draws.

τ is either fixed (``memorization.threshold`` or the metric's default), given (``tau``) or, with
``calibrate_fpr``, calibrated on the measured model's own generations so that at most that
share of calibration images (held-out real images where available) would count as
reconstructed (:mod:`diffcurate.metrics.mem_calibration`; seed 000's rule). The gate calibrates
on the model before mitigation and passes that τ to the candidate's measurement. Whenever
calibration images are given, the result reports the share of them that the rule in force
counts as reconstructed (``heldout_fpr``): how far to trust a Mem% from a fixed or given τ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.metrics.mem_calibration import (
    Calibration,
    closest_values,
    false_positives,
    threshold_at_fpr,
)
from diffcurate.metrics.memorization import Exclusion, MemorizationPolicy, MemResult, mem_percent
from diffcurate.metrics.retrigger import RetriggerResult
from diffcurate.metrics.utility import (
    KIDResult,
    PixelFeatureConfig,
    frechet_distance,
    kernel_inception_distance,
    pixel_features,
)
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.retrigger import RetriggerConfig
from diffcurate.models.sample import generate


class MeasureConfig(BaseModel):
    """How a model is sampled and compared for the gates.

    Attributes:
        generations: Unconditional samples per model (also the utility sample size).
        generations_per_secret: Conditional models: samples per secret caption.
        inference_steps: DDIM steps per sample.
        guidance_scale: Conditional models: classifier-free guidance scale (1 = none); ignored
            for unconditional models.
        seed: Keyed initial noises (identical for the before and after models).
        rule: ``absolute`` (distance < τ), ``relative`` (Carlini et al.'s ratio < δ, needs
            neighbours) or ``auto``: relative for latent models (a VAE decodes the
            generations), absolute otherwise. A ``memorization`` metric that is already
            relative is kept as it is.
        memorization: Reconstruction metric and threshold τ.
        calibrate_fpr: If set, τ is calibrated to this false-positive rate on calibration
            images instead of taken from ``memorization`` (see the module docstring).
        calibration_size: At most this many calibration images are used.
        features: Feature extractor for FD/KID.
        kid_subsets: KID subsets.
        kid_subset_size: Rows per KID subset.
        device: ``cpu`` or ``cuda``.
        retrigger: The re-trigger probe (text-conditional models; off by default): Mem% from
            perturbed caption embeddings, judged by the same rule and τ
            (:mod:`diffcurate.curation.retrigger`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    generations: int = Field(256, ge=2)
    generations_per_secret: int = Field(8, ge=1)
    inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    seed: int = 0
    rule: Literal["auto", "absolute", "relative"] = "auto"
    memorization: MemorizationPolicy = Field(default_factory=MemorizationPolicy)
    calibrate_fpr: float | None = Field(None, gt=0.0, le=0.5)
    calibration_size: int = Field(1000, ge=1)
    features: PixelFeatureConfig = Field(default_factory=PixelFeatureConfig)
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(100, ge=2)
    device: str = "cpu"
    retrigger: RetriggerConfig = Field(default_factory=RetriggerConfig)

    def policy_for(self, model: DiffusionModel) -> MemorizationPolicy:
        """The reconstruction policy in force for ``model`` (see ``rule``)."""
        policy = self.memorization
        relative = self.rule == "relative" or (self.rule == "auto" and model.vae is not None)
        if policy.relative or not relative:
            if self.rule == "absolute" and policy.relative:
                return policy.model_copy(update={"metric": policy.metric.removeprefix("relative_")})
            return policy
        metric = "relative_l2" if policy.metric == "l2" else "relative_tiled_l2"
        return policy.model_copy(update={"metric": metric})


class ModelMeasurement(BaseModel):
    """Mem%, FD and KID of one model.

    Attributes:
        mem: Mem% and per-secret details under the rule in force.
        fd: Fréchet distance of the utility generations to the reference images.
        kid: KID, likewise.
        n_generated: Utility generations.
        n_reference: Reference images.
        calibration: How τ was calibrated (None: fixed or given).
        guidance_scale: Guidance the conditional generations used (None: unconditional model).
        heldout_images: Calibration images judged (None: none given).
        heldout_false_positives: How many of them the rule in force counts as reconstructed.
        heldout_fpr: ``heldout_false_positives / heldout_images``.
        retrigger: Re-trigger Mem% under the same rule and τ, when the probe ran (filled in by
            :func:`diffcurate.curation.retrigger.measure_retrigger`'s caller).
    """

    model_config = ConfigDict(frozen=True)

    mem: MemResult
    fd: float
    kid: KIDResult
    n_generated: int
    n_reference: int
    calibration: Calibration | None = None
    guidance_scale: float | None = None
    heldout_images: int | None = None
    heldout_false_positives: int | None = None
    heldout_fpr: float | None = None
    retrigger: RetriggerResult | None = None


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
    unconditional: torch.Tensor | None = None,
    neighbours: torch.Tensor | None = None,
    neighbour_copies: Exclusion | None = None,
    calibration_copies: Exclusion | None = None,
) -> ModelMeasurement:
    """Sample ``model`` and measure memorization of ``secrets`` and utility vs ``reference``.

    Args:
        model: The model to measure.
        secrets: ``[S, C, H, W]`` distinct secret/canary images in [-1, 1].
        secret_ids: One unique id per secret.
        reference: ``[R, C, H, W]`` real images in [-1, 1] for FD/KID.
        config: Sampling and metric settings.
        secret_conditioning: Conditional models: caption embeddings ``[S, seq, dim]``.
        reference_conditioning: Conditional models: embeddings of captions to sample the
            utility set from ``[m, seq, dim]`` (cycled to ``generations`` rows).
        save_closest_to: If given, each secret's closest generation is written there as
            ``<secret_id>.png`` (for reviewers: the near-copy beside its training image).
        tau: Use this τ (e.g. one calibrated on the model before mitigation); overrides both
            ``memorization.threshold`` and ``calibrate_fpr``.
        calibration_images: ``[n, C, H, W]`` in [-1, 1] (the first ``calibration_size`` are
            used): held-out images, or kept training images standing in. Required when
            ``calibrate_fpr`` is set and ``tau`` is not; whenever given, the held-out
            false-positive rate of the rule in force is reported.
        calibration_conditioning: Conditional models: their caption embeddings; each image is
            then generated for ``generations_per_secret`` times from its own caption.
        unconditional: Conditional models: the empty caption's states ``[1, seq, dim]``, for
            classifier-free guidance (required unless ``guidance_scale`` is 1).
        neighbours: Relative metrics: training images ``[N, C, H, W]`` in [-1, 1].
        neighbour_copies: Relative metrics: per secret, the ``neighbours`` rows that are its
            copies (left out of its S), as a bool mask ``[S, N]`` or index collections.
        calibration_copies: Likewise per calibration image (stand-in training images; None
            for held-out images).

    Raises:
        ValueError: Duplicate secret ids, missing caption embeddings, guidance without
            ``unconditional``, a relative metric without ``neighbours``, or calibration asked
            for without calibration images.
    """
    config = config or MeasureConfig()
    if len(set(secret_ids)) != len(secret_ids):
        dup = sorted({s for s in secret_ids if secret_ids.count(s) > 1})
        raise ValueError(f"duplicate secret ids {dup[:5]}: pass each secret once (a secret "
                         "duplicated in the training set is still one secret)")  # fmt: skip
    if len(secret_ids) != len(secrets):
        raise ValueError(f"{len(secret_ids)} secret ids for {len(secrets)} secrets")
    policy = config.policy_for(model)
    if policy.relative and neighbours is None:
        raise ValueError(f"{policy.metric} needs `neighbours` (the training images)")
    guidance = None
    if model.conditional:
        if secret_conditioning is None or reference_conditioning is None:
            raise ValueError("a text-conditional model is measured from caption embeddings")
        guidance = config.guidance_scale
        if guidance != 1.0 and unconditional is None:
            raise ValueError(f"guidance_scale {guidance:g} needs `unconditional` (the empty "
                             "caption's encoder states); pass it, or set guidance_scale=1 to "
                             "sample without guidance")  # fmt: skip
        k = config.generations_per_secret
        mem_gens = _sample(model, config, secret_conditioning.repeat_interleave(k, dim=0),
                           config.seed, unconditional)  # fmt: skip
        generated_for = [sid for sid in secret_ids for _ in range(k)]
        idx = torch.arange(config.generations) % len(reference_conditioning)
        util_gens = _sample(model, config, reference_conditioning[idx], config.seed + 1,
                            unconditional)  # fmt: skip
    else:
        util_gens = generate(model, config.generations, seed=config.seed,
                             num_inference_steps=config.inference_steps,
                             device=config.device)  # fmt: skip
        mem_gens, generated_for = util_gens, None
    near = None if neighbours is None else to_unit(neighbours)

    closest, calibration, n_cal_gens = None, None, 0
    if calibration_images is not None and len(calibration_images):
        closest, n_cal_gens = _calibration_closest(
            model, config, mem_gens, calibration_images, calibration_conditioning,
            unconditional, near, calibration_copies,
        )  # fmt: skip
    if tau is not None:
        policy = policy.model_copy(update={"threshold": tau})
    elif config.calibrate_fpr is not None:
        if closest is None:
            raise ValueError("calibrate_fpr needs calibration images (held-out or kept images)")
        calibration = threshold_at_fpr(closest, policy, config.calibrate_fpr, n_cal_gens)
        policy = policy.model_copy(update={"threshold": calibration.tau})
    mem = mem_percent(
        to_unit(mem_gens),
        to_unit(secrets),
        policy=policy,
        secret_ids=secret_ids,
        generated_for=generated_for,
        neighbours=near if policy.relative else None,
        exclude=neighbour_copies if policy.relative else None,
    )
    if save_closest_to is not None:
        save_closest(mem_gens, mem, save_closest_to)
    fake = pixel_features(to_unit(util_gens), config.features)
    real = pixel_features(to_unit(reference), config.features)
    kid = kernel_inception_distance(
        fake, real, subsets=config.kid_subsets, subset_size=config.kid_subset_size,
        seed=config.seed,
    )  # fmt: skip
    heldout = {}
    if closest is not None:
        count = false_positives(closest, policy, policy.tau)
        heldout = {"heldout_images": len(closest), "heldout_false_positives": count,
                   "heldout_fpr": count / len(closest)}  # fmt: skip
    return ModelMeasurement(
        mem=mem,
        fd=frechet_distance(fake, real),
        kid=kid,
        n_generated=len(util_gens),
        n_reference=len(reference),
        calibration=calibration,
        guidance_scale=guidance,
        **heldout,
    )


def _sample(
    model: DiffusionModel,
    config: MeasureConfig,
    conditioning: torch.Tensor,
    seed: int,
    unconditional: torch.Tensor | None,
) -> torch.Tensor:
    """Caption-prompted generations, guided at ``config.guidance_scale``."""
    return generate(model, len(conditioning), seed=seed,
                    num_inference_steps=config.inference_steps, conditioning=conditioning,
                    guidance_scale=config.guidance_scale, unconditional=unconditional,
                    device=config.device)  # fmt: skip


def _calibration_closest(
    model: DiffusionModel,
    config: MeasureConfig,
    mem_gens: torch.Tensor,
    images: torch.Tensor,
    conditioning: torch.Tensor | None,
    unconditional: torch.Tensor | None,
    neighbours: np.ndarray | None,
    copies: Exclusion | None,
) -> tuple[np.ndarray, int]:
    """Each calibration image's closest generation under the configured metric, and how many
    generations it was judged against (unconditional: the secrets' generations; conditional:
    ``generations_per_secret`` from its own caption)."""
    images = images[: config.calibration_size]
    copies = None if copies is None else copies[: len(images)]
    owners = None
    gens = mem_gens  # unconditional: the same generations the secrets are compared with
    if model.conditional:
        if conditioning is None:
            raise ValueError("a text-conditional model is calibrated from caption embeddings")
        k = config.generations_per_secret
        cond = conditioning[: len(images)].repeat_interleave(k, dim=0)
        gens = _sample(model, config, cond, config.seed + 2, unconditional)
        owners = np.repeat(np.arange(len(images)), k).tolist()
    policy = config.policy_for(model)
    closest = closest_values(to_unit(gens), to_unit(images), policy, owners,
                             neighbours if policy.relative else None,
                             copies if policy.relative else None)  # fmt: skip
    return closest, len(gens)


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
