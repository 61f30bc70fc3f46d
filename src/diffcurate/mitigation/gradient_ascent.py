"""Retain loss plus a capped gradient-ascent term on the removed samples.

The simplest unlearning objective (the "GA" baseline of the diffusion-unlearning literature,
e.g. EraseDiff's and SalUn's comparisons): ``L = L_retain − w · min(L_forget, cap)``. Ascent on
the removed samples' denoising loss pushes the model off their denoising trajectory; the cap
bounds the term, because unbounded ascent diverges (the loss of a predictor can grow without
limit) and then wrecks the kept samples too. Once a forget batch's loss passes the cap, its
gradient is zero and only the retain term acts. The default cap, 1.0, is the loss of a model
that predicts nothing for an ε-target of unit variance: "no better than knowing nothing".
"""

from __future__ import annotations

import torch

from diffcurate.mitigation.base import register_mitigation
from diffcurate.mitigation.loop import FineTuneLoop, LoopMitigation


def capped_ascent_step(loop: FineTuneLoop, step: int) -> tuple[float, float]:
    """Backward of ``L_retain − w · min(L_forget, cap)`` for one step."""
    cfg = loop.config
    retain = loop.loss(loop.retain_batch(step))
    forget = loop.loss(loop.forget_batch(step))
    total = retain - cfg.forget_weight * torch.clamp(forget, max=cfg.forget_cap)
    total.backward()
    return float(retain.detach()), float(forget.detach())


class GradientAscent(LoopMitigation):
    """Fine-tune on the kept samples while ascending, up to a cap, on the removed ones."""

    name = "gradient-ascent"
    needs_forget = True
    summary = "retain loss minus a capped ascent on the removed samples' loss"

    def step(self, loop: FineTuneLoop, step: int) -> tuple[float, float]:
        return capped_ascent_step(loop, step)


register_mitigation(GradientAscent())
