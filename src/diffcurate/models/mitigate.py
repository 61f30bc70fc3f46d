"""Mitigation after pruning: surgical fine-tune (seed 000 §3.4) or retraining from scratch.

* ``finetune`` — continue training the released model on the pruned set for a few epochs at a
  very low learning rate (seed 000: one epoch, lr 2e-6). The premise is that removing the
  highest-curvature samples and briefly re-fitting on the rest lets the model relax away from
  the sharp minima that encode copies, at a tiny fraction of retraining cost and without
  hurting utility. Its effect on a given model is an empirical question, which is exactly what
  the gate step measures afterwards; we report what we measure rather than assume it works.
* ``retrain`` — a fresh initialisation of the same architecture trained on the pruned set:
  the gold standard of "the model that never saw these images", affordable for small models
  and benchmarks.

Both work on what the model consumes (:mod:`diffcurate.models.inputs`): pixels, or VAE latents
with caption states for latent text-to-image pipelines, where the VAE and text encoder stay
frozen and captions are dropped with ``caption_dropout`` so the candidate keeps classifier-free
guidance. Neither modifies the input model: both work on a deep copy.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.train import TrainConfig, TrainResult, train


class MitigationConfig(BaseModel):
    """How the candidate model is produced from the pruned set.

    Attributes:
        method: ``finetune`` (surgical, default) or ``retrain`` (from scratch).
        epochs: Fine-tune epochs over the pruned set (seed 000: 1).
        lr: Fine-tune learning rate (seed 000: 2e-6).
        retrain_steps: Optimiser steps when retraining.
        retrain_lr: Learning rate when retraining.
        batch_size: Images per step.
        caption_dropout: Text-conditional models: share of captions replaced by the empty
            caption in each step (SD's 0.1), so guidance keeps working on the candidate.
        seed: Seeds data order and noise (and the fresh initialisation when retraining).
        device: ``cpu`` or ``cuda``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["finetune", "retrain"] = "finetune"
    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-6, gt=0)
    retrain_steps: int = Field(3000, ge=1)
    retrain_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"

    def steps_for(self, n_images: int) -> int:
        """Optimiser steps the method takes on ``n_images`` pruned images."""
        if self.method == "retrain":
            return self.retrain_steps
        return self.epochs * math.ceil(n_images / self.batch_size)


def fresh_copy(model: DiffusionModel, seed: int) -> DiffusionModel:
    """The same architecture, scheduler and VAE with a new seeded initialisation of the UNet."""
    torch.manual_seed(seed)
    unet = type(model.unet).from_config(model.unet.config)
    param = next(model.unet.parameters())
    return DiffusionModel(
        unet=unet.to(device=param.device, dtype=param.dtype),
        scheduler=copy.deepcopy(model.scheduler),
        vae=model.vae,
        text_encoder=model.text_encoder,
    )


def mitigate(
    model: DiffusionModel,
    pruned_images: torch.Tensor,
    config: MitigationConfig | None = None,
    conditioning: torch.Tensor | None = None,
    progress: bool = False,
    unconditional: torch.Tensor | None = None,
) -> tuple[DiffusionModel, TrainResult]:
    """Produce the candidate model from the pruned training images.

    Args:
        model: The released model (left unchanged).
        pruned_images: ``x0`` of the kept samples in diffusion space (pixels in [-1, 1], or VAE
            latents for latent models).
        config: Method and hyper-parameters.
        conditioning: Caption embeddings aligned with ``pruned_images`` (conditional models).
        unconditional: The empty caption's states (conditional models; caption dropout).
        progress: Show a progress bar.

    Returns:
        The candidate model (path unset) and the training record.
    """
    config = config or MitigationConfig()
    if len(pruned_images) == 0:
        raise ValueError("nothing left to train on: the pruned set is empty")
    if config.method == "retrain":
        candidate = fresh_copy(model, config.seed)
        lr = config.retrain_lr
    else:
        candidate = DiffusionModel(
            unet=copy.deepcopy(model.unet),
            scheduler=copy.deepcopy(model.scheduler),
            vae=model.vae,
            text_encoder=model.text_encoder,
        )
        lr = config.lr
    dropout = (
        config.caption_dropout if conditioning is not None and unconditional is not None else 0
    )
    train_config = TrainConfig(
        steps=config.steps_for(len(pruned_images)),
        batch_size=config.batch_size,
        lr=lr,
        seed=config.seed,
        log_every=0,
        caption_dropout=dropout,
        device=config.device,
    )
    result = train(
        candidate, pruned_images, train_config, progress=progress, conditioning=conditioning,
        unconditional=unconditional,
    )  # fmt: skip
    return candidate, result
