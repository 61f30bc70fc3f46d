"""Retraining from a fresh initialisation on the kept samples.

The gold standard of "the model that never saw these images", and the compute yardstick the
other methods are measured against; affordable for small models and benchmarks only.
"""

from __future__ import annotations

import copy

import torch

from diffcurate.mitigation.base import (
    MitigationConfig,
    MitigationData,
    MitigationResult,
    register_mitigation,
)
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.train import TrainConfig, train


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


class Retrain:
    """A fresh UNet trained for ``retrain_steps`` at ``retrain_lr`` on the kept samples."""

    name = "retrain"
    needs_forget = False
    summary = "retrain from a fresh initialisation on the kept samples"

    def steps_for(self, config: MitigationConfig, n_retain: int) -> int:
        return config.retrain_steps

    def run(
        self, model: DiffusionModel, data: MitigationData, config: MitigationConfig, progress: bool
    ) -> tuple[DiffusionModel, MitigationResult]:
        candidate = fresh_copy(model, config.seed)
        conditional = data.retain.conditional and data.unconditional is not None
        result = train(
            candidate,
            data.retain,
            TrainConfig(
                steps=config.retrain_steps,
                batch_size=config.batch_size,
                lr=config.retrain_lr,
                seed=config.seed,
                log_every=0,
                caption_dropout=config.caption_dropout if conditional else 0.0,
                device=config.device,
            ),
            progress=progress,
            unconditional=data.unconditional,
        )
        return candidate, MitigationResult(
            method=self.name,
            losses=result.losses,
            steps=config.retrain_steps,
            sample_passes=config.retrain_steps * config.batch_size,
            seconds=result.seconds,
        )


register_mitigation(Retrain())
