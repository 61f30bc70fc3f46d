"""A kept/removed split with an over-represented removed image, and a loss under fixed
draws, shared by the mitigation tests (``tests/`` is on ``sys.path``)."""

from __future__ import annotations

import torch


def split(n_keep: int = 24, copies: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(n_keep, 1, 8, 8, generator=gen) * 2 - 1
    secret = torch.rand(1, 1, 8, 8, generator=gen) * 2 - 1
    return keep, secret.repeat(copies, 1, 1, 1)


def fixed_loss(model, x0: torch.Tensor, seed: int = 99, draws: int = 8) -> float:
    """The diffusion loss of ``x0`` under fixed (t, ε) draws: comparable before and after."""
    from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule

    objective = DiffusionObjective(model.scheduler, TimestepSchedule(band=(0, 1000)), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(0, 1000, (len(x0),), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            out = model.unet(objective.noisy(x0, t, eps), t).sample
            total += float(((out - objective.target(x0, t, eps)) ** 2).mean())
    return total / draws
