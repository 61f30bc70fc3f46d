"""Data-space divergence tr(∂ε̂_θ(x_t, t)/∂x_t) per sample (Jeon et al.-style sharpness).

Jeon et al. (2024), cited by the seed paper as the global memorization diagnostic, read
memorization off the curvature of the learned log density in DATA space. With the score
s_θ(x_t) = −ε̂_θ(x_t, t)/σ_t, the log-density Hessian is −(1/σ_t) ∂ε̂/∂x_t, so a sharp peak
(very negative log-density curvature) is a large POSITIVE tr(∂ε̂/∂x_t). We return that trace
as is: high = sharp = risky, like the other signals.

For a v-prediction model the network output is converted to the implied ε̂ = sqrt(ᾱ) v̂ +
sqrt(1−ᾱ) x_t first (so ∂ε̂/∂x_t = sqrt(ᾱ) ∂v̂/∂x_t + sqrt(1−ᾱ) I), to keep the signal's meaning
independent of the parameterisation. In latent mode x_t is the noisy latent.

Estimation: Hutchinson, tr(A) = E_v[vᵀ A v] for Rademacher v, with vᵀA from one vector–Jacobian
product w.r.t. the input (A = ∂ε̂/∂x_t is not symmetric; the estimator is still unbiased). The
exact mode uses the D input basis vectors, i.e. the dense Jacobian row by row, and sums its
diagonal. Draws are the objective's common random numbers; probes are keyed by
(seed, sample, draw) like them, so scores do not depend on batch composition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import vjp

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    Mapper,
    SampleKey,
    ScoreResult,
    item_probes,
    map_items,
    on_device,
    resolve_device,
    scoring_mode,
    summarise,
    trainable_params,
)


class DivergenceConfig(BaseModel):
    """Configuration of the data-space divergence.

    Attributes:
        exact: Dense input Jacobian instead of probes (tiny inputs only: D backward passes).
        probes: Hutchinson probes per (sample, draw).
        seed: Seed of the probes (the (t, ε) seed lives in the objective).
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        vectorize: Use ``torch.func.vmap`` (falls back to loops without a batching rule).
        item_chunk: (sample, draw) items per vectorised call.
        probe_chunk: Probes (or basis vectors) per vectorised call.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    exact: bool = False
    probes: int = Field(8, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    vectorize: bool = True
    item_chunk: int = Field(8, ge=1)
    probe_chunk: int = Field(64, ge=1)


def _divergence_item(
    objective: DiffusionObjective, model: torch.nn.Module, chunk: int
) -> Callable[[Mapper], Callable[..., torch.Tensor]]:
    """Per-item estimates ``[P]``: vᵀ (∂ε̂/∂x_t) v for each probe v (or basis vector)."""
    f = objective.network(model)
    params = trainable_params(model)

    def build(mapper: Mapper) -> Callable[..., torch.Tensor]:
        def item(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, v: torch.Tensor):
            def eps_hat(x: torch.Tensor) -> torch.Tensor:
                out = f(params, x, t, cond).reshape(x.shape)
                return objective.epsilon_from_output(out, x, t).reshape(-1)

            _, vjp_fn = vjp(eps_hat, x_t)
            parts = [
                mapper(lambda vi: (vjp_fn(vi)[0].reshape(-1) * vi).sum())(v[s : s + chunk])
                for s in range(0, v.shape[0], chunk)
            ]
            return torch.cat(parts)

        return item

    return build


def divergence_scores(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: DivergenceConfig | None = None,
    cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Per-sample data-space divergence, averaged over the objective's draws and the probes.

    Args:
        objective: Loss, noise and timestep schedule, draw seed.
        model: The denoiser (not modified: it is copied if dtype/device differ).
        images: ``[n, C, H, W]`` images (encoded by the objective's VAE if any).
        sample_keys: One stable id per image.
        config: Probes, dtype, device (defaults: 8 probes, float32, CPU).
        cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]``.

    Returns:
        A :class:`ScoreResult` (``per_layer`` is None): high = sharp = risky.
    """
    config = config or DivergenceConfig()
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    with scoring_mode(net):
        batch = objective.prepare(images, sample_keys, dtype, device, cond)
        keys, draw_idx, dim = batch.item_keys, batch.item_draws, batch.dim

        def args(sl: slice) -> tuple[object, ...]:
            if config.exact:
                eye = torch.eye(dim, dtype=dtype, device=device)
                v = eye.expand(len(keys[sl]), dim, dim)
            else:
                v = item_probes(
                    config.seed, "div-probe", keys[sl], draw_idx[sl], config.probes, dim
                )
                v = v.to(batch.x_t)
            return (batch.x_t[sl], batch.t[sl], batch.cond_at(sl), v)

        build = _divergence_item(objective, net, config.probe_chunk)
        est, used_vmap = map_items(build, len(batch), args, config.item_chunk, config.vectorize)
    if config.exact:
        est = est.sum(dim=1, keepdim=True)  # Σ_k e_kᵀ A e_k = tr(A)
    method = "/".join(
        ("divergence", "exact" if config.exact else "hutchinson", "vmap" if used_vmap else "loop")
    )
    n, k = batch.n_samples, batch.n_draws
    return summarise(est.reshape(n, k, -1), objective.schedule, batch.sample_keys, method)
