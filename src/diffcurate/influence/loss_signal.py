"""Per-sample diffusion loss on the objective's common-random-number draws.

A memorized training image is denoised unusually well, so a LOW loss is the risk signal
(``DESIGN.md`` measures recall@1% 0.9 at t=100 on the tiny DDPM). Sign convention: every
``ScoreResult.score`` in :mod:`diffcurate.influence` is HIGH for risky samples, so this signal's
``score`` is the NEGATIVE mean loss, ``-mean_draws mean_elements (f - y)²``; its
``per_timestep`` parts are negated the same way. ``stderr`` is the standard error of the mean
over draws (unsigned). Use :func:`loss_values` for the plain, positive losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    on_device,
    resolve_device,
    scoring_mode,
    summarise,
)


class LossSignalConfig(BaseModel):
    """Configuration of the per-sample loss signal.

    Attributes:
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        batch_items: (sample, draw) items per forward pass (memory bound only).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_items: int = Field(64, ge=1)


def loss_values(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: LossSignalConfig | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-(sample, draw) losses ``[n, K]`` (positive, float64 on CPU), on the keyed draws."""
    config = config or LossSignalConfig()
    keys = list(sample_keys)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    with scoring_mode(net):
        batch = objective.prepare(images, keys, dtype, device, cond)
        losses = objective.batch_loss(net, batch, batch_items=config.batch_items)
    if not torch.isfinite(losses).all():
        rows = torch.nonzero(~torch.isfinite(losses).all(dim=1)).flatten().tolist()
        bad = [keys[i] for i in rows]
        raise FloatingPointError(f"non-finite diffusion loss for samples {bad[:10]}")
    return losses.to(device="cpu", dtype=torch.float64)


def loss_scores(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: LossSignalConfig | None = None,
    cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Risk score = NEGATIVE per-sample diffusion loss (high = low loss = risky).

    Args:
        objective: Loss, noise and timestep schedule, draw seed.
        model: The denoiser (not modified: it is copied if dtype/device differ).
        images: ``[n, C, H, W]`` images (encoded by the objective's VAE if any).
        sample_keys: One stable id per image.
        config: dtype, device, batch size.
        cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]``.
    """
    losses = loss_values(objective, model, images, sample_keys, config, cond)
    return summarise(-losses[:, :, None], objective.schedule, sample_keys, "loss/negated")
