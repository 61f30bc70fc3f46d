"""Mitigation after pruning: methods that turn the released model into a candidate.

One method per module, each registered by name (:mod:`diffcurate.mitigation.base`):

* ``finetune``: surgical fine-tune on the kept samples (seed 000 §3.4), steps and lr as set;
* ``layer-finetune``: the same, but only the layers where the removed samples' curvature
  concentrates are trained;
* ``erasediff``: EraseDiff unlearning of the removed samples (arXiv 2401.05779);
* ``gradient-ascent``: retain loss minus a capped ascent on the removed samples;
* ``retrain``: a fresh initialisation trained on the kept samples (the yardstick).

Text-conditional models take the caption-side settings (noise injection, random caption
replacement, dropout: :mod:`diffcurate.mitigation.captions`) in every fine-tune method.
``benchmarks/mitigation.py`` measures them side by side; the default method is the one that
measured best there (README, "Mitigation").
"""

from __future__ import annotations

import torch

from diffcurate.mitigation import erasediff, finetune, gradient_ascent, layer_targeted, retrain
from diffcurate.mitigation.base import (
    Mitigation,
    MitigationConfig,
    MitigationData,
    MitigationResult,
    get_mitigation,
    mitigation_names,
    register_mitigation,
)
from diffcurate.mitigation.retrain import fresh_copy
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.training_data import TrainingData, as_training_data

__all__ = [
    "Mitigation",
    "MitigationConfig",
    "MitigationData",
    "MitigationResult",
    "erasediff",
    "finetune",
    "fresh_copy",
    "get_mitigation",
    "gradient_ascent",
    "layer_targeted",
    "mitigate",
    "mitigation_names",
    "register_mitigation",
    "retrain",
]


def mitigate(
    model: DiffusionModel,
    pruned_images: torch.Tensor | TrainingData,
    config: MitigationConfig | None = None,
    conditioning: torch.Tensor | None = None,
    progress: bool = False,
    unconditional: torch.Tensor | None = None,
    removed_images: torch.Tensor | TrainingData | None = None,
    removed_conditioning: torch.Tensor | None = None,
) -> tuple[DiffusionModel, MitigationResult]:
    """Produce the candidate model from the pruned split.

    Args:
        model: The released model (left unchanged).
        pruned_images: ``x0`` of the kept samples in diffusion space (pixels in [-1, 1], or VAE
            latents for latent models), or a ``TrainingData`` serving them (with their caption
            states) batch by batch, e.g. :class:`~diffcurate.models.lance_data.LanceTrainingData`.
        config: Method and hyper-parameters (default: the measured default method).
        conditioning: Caption states aligned with ``pruned_images`` (conditional models; only
            beside tensors).
        progress: Show a progress bar.
        unconditional: The empty caption's states (conditional models; caption dropout).
        removed_images: ``x0`` of the removed samples (methods that need the forget set), as
            tensors or a ``TrainingData``.
        removed_conditioning: Their caption states (only beside tensors).

    Returns:
        The candidate model (path unset) and the method's record.

    Raises:
        ValueError: Nothing is left to train on, or the method needs the removed samples and
            none were given.
    """
    config = config or MitigationConfig()
    if len(pruned_images) == 0:
        raise ValueError("nothing left to train on: the pruned set is empty")
    method = get_mitigation(config.method)
    if method.needs_forget and (removed_images is None or len(removed_images) == 0):
        raise ValueError(f"{config.method} needs the removed samples, and none were given")
    forget = None
    if method.needs_forget:
        assert removed_images is not None
        forget = as_training_data(removed_images, removed_conditioning)
    data = MitigationData(
        retain=as_training_data(pruned_images, conditioning),
        forget=forget,
        unconditional=unconditional if config.caption_dropout > 0 else None,
    )
    return method.run(model, data, config, progress)
