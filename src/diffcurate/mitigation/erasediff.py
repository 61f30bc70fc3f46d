"""EraseDiff (Wu, Le, Hayat, Harandi, "Erasing Undesirable Influence in Diffusion Models",
arXiv 2401.05779): unlearning the removed samples as a constrained problem.

EraseDiff keeps the model's denoising on the kept samples ``D_r`` while moving it off the
denoising trajectory of the removed samples ``D_f``:

    min_θ  F(θ) = E_{D_r, t, ε} ‖ε − ε_θ(x_t, t)‖²
    s.t.   θ ∈ argmin f,   f(θ) = E_{D_f, t, ε} ‖ε_f − ε_θ(x_t, t)‖²,   ε_f ~ U(0, 1)

so on a removed sample the model learns to predict noise of another distribution (uniform)
instead of the Gaussian noise that was added, and sampling no longer leads back to it. The
paper solves this with the value-function approach of first-order bilevel optimisation (Liu et
al., "BOME! Bilevel Optimization Made Easy", 2022): with ``q(θ) = f(θ) − f(φ_K)``, where
``φ_K`` is K gradient steps on ``f`` from θ (an estimate of ``min f``, not differentiated
through), each step moves along

    d = ∇F(θ) + λ ∇q(θ),   λ = max((η‖∇q‖² − ⟨∇F, ∇q⟩) / ‖∇q‖², 0),

the smallest multiple of ∇q that makes the step decrease ``q`` at rate at least η‖∇q‖² while
following ``F`` as far as that allows. Here ``∇q(θ) = ∇f(θ) − ∇f(φ_K)`` on the same forget
batch and draws. For v-prediction models the uniform draw replaces ε inside the v target.
Compute per step: one retain batch and ``K + 2`` passes over the forget batch.
"""

from __future__ import annotations

import torch

from diffcurate.keyed import keyed_generator
from diffcurate.mitigation.base import register_mitigation
from diffcurate.mitigation.loop import FineTuneLoop, LoopMitigation


def bome_multiplier(g_upper: list[torch.Tensor], g_q: list[torch.Tensor], eta: float) -> float:
    """BOME's λ = max((η‖∇q‖² − ⟨∇F, ∇q⟩) / ‖∇q‖², 0); 0 when ∇q vanishes."""
    qq = sum(float((g.double() ** 2).sum()) for g in g_q)
    if qq == 0.0:
        return 0.0
    fq = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_upper, g_q, strict=True))
    return max((eta * qq - fq) / qq, 0.0)


def erasediff_step(loop: FineTuneLoop, step: int) -> tuple[float, float]:
    """Install EraseDiff's update direction for one step; returns (retain, forget) losses."""
    cfg = loop.config
    retain_batch, forget_batch = loop.retain_batch(step), loop.forget_batch(step)
    retain = loop.loss(retain_batch)
    g_upper = loop.grads(retain)
    gen = keyed_generator(cfg.seed, "forget", "uniform-target", step)
    eps_f = torch.rand(forget_batch.eps.shape, generator=gen).to(forget_batch.eps)
    target = loop.objective.target(forget_batch.x0, forget_batch.t, eps_f)
    forget = loop.loss(forget_batch, target)
    g_f = loop.grads(forget)
    phi = {n: p.detach().clone().requires_grad_(True) for n, p in loop.params.items()}
    for _ in range(cfg.erase_inner_steps):
        inner = torch.autograd.grad(loop.loss(forget_batch, target, phi), list(phi.values()))
        phi = {
            n: (v - cfg.erase_inner_lr * g).detach().requires_grad_(True)
            for (n, v), g in zip(phi.items(), inner, strict=True)
        }
    g_phi = torch.autograd.grad(loop.loss(forget_batch, target, phi), list(phi.values()))
    g_q = [a - b for a, b in zip(g_f, g_phi, strict=True)]
    lam = bome_multiplier(g_upper, g_q, cfg.erase_eta)
    loop.set_grads([a + lam * b for a, b in zip(g_upper, g_q, strict=True)])
    multipliers = loop.detail.setdefault("lambda", [])
    assert isinstance(multipliers, list)
    multipliers.append(lam)
    return float(retain.detach()), float(forget.detach())


class EraseDiff(LoopMitigation):
    """Retain the kept samples, erase the removed ones (value-function bilevel update)."""

    name = "erasediff"
    needs_forget = True
    summary = "EraseDiff unlearning of the removed samples (arXiv 2401.05779)"

    def step(self, loop: FineTuneLoop, step: int) -> tuple[float, float]:
        return erasediff_step(loop, step)


register_mitigation(EraseDiff())
