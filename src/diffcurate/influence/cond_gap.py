"""Text-conditional memorization signal: the conditional-minus-unconditional noise magnitude.

Wen, Liu, Chen & Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"
(ICLR 2024), §3: when a prompt is memorized, the text-conditional noise prediction departs
strongly from the unconditional one from the very first sampling steps, because the prompt
alone pins the trajectory to one training image. Their detection metric for a prompt p is

    d(p) = (1/S) Σ_{steps s ≤ S} ‖ε_θ(x_{t_s}, e_p) − ε_θ(x_{t_s}, e_∅)‖₂

averaged over G generations from independent initial noises x_T, measured along the model's own
classifier-free-guided sampling trajectory (e_∅ = embedding of the empty prompt). They report
that the first step alone (S = 1) with a few generations already separates memorized prompts
(AUC ≈ 0.96–0.99 on Stable Diffusion), which makes the metric cheap: 2 UNet passes per step per
generation, no gradients and no training image.

What we compute, per training sample (its caption is the prompt):
  * G generations (default 4), each starting from x_T ~ N(0, I) drawn from a generator keyed by
    (seed, sample key, "cond-gap-x_T", g): common random numbers like every other signal here,
    so a caption's score does not depend on its batch or shard.
  * A DDIM trajectory with ``inference_steps`` steps (default 50, η = 0) and guidance scale w
    (default 7.5, Stable Diffusion's default); at each of the first ``measure_steps`` steps
    (default 1) the L2 norm over all elements of ε_c − ε_u is recorded; for v-prediction models
    both outputs are converted to ε first (the metric is about noise predictions).
  * score = mean over generations and measured steps (HIGH = risky, like every signal);
    per_timestep = the mean per measured step; stderr over the G·S values.

The image itself is not used: this is a property of the caption under the model. Two samples
with the same caption get the same score, which is the point (duplicated captions are the main
memorization trigger Wen et al. and Somepalli et al. describe).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    TimestepSchedule,
    keyed_generator,
    on_device,
    resolve_device,
    scoring_mode,
    summarise,
)


class CondGapConfig(BaseModel):
    """Settings of the conditional-minus-unconditional signal (defaults from Wen et al.).

    Attributes:
        generations: Independent initial noises per caption.
        inference_steps: DDIM steps of the sampling trajectory.
        measure_steps: How many of the first steps are measured (1 = first step only).
        guidance_scale: Classifier-free guidance weight of the trajectory.
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        batch_items: Generations per forward pass (memory bound only).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    generations: int = Field(4, ge=1)
    inference_steps: int = Field(50, ge=1)
    measure_steps: int = Field(1, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_items: int = Field(64, ge=1)


def sampler_timesteps(objective: DiffusionObjective, config: CondGapConfig) -> tuple[int, ...]:
    """The measured timesteps: the first ``measure_steps`` of the DDIM schedule."""
    if config.measure_steps > config.inference_steps:
        raise ValueError(
            f"measure_steps ({config.measure_steps}) exceeds inference_steps "
            f"({config.inference_steps})"
        )
    ddim = DDIMScheduler.from_config(objective.scheduler.config)
    ddim.set_timesteps(config.inference_steps)
    return tuple(int(t) for t in ddim.timesteps[: config.measure_steps])


def initial_noise(
    objective: DiffusionObjective,
    sample_keys: Sequence[SampleKey],
    generations: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """``[n, G, *shape]`` float64 x_T, each keyed by (seed, sample key, generation)."""
    out = torch.empty((len(sample_keys), generations, *shape), dtype=torch.float64)
    for i, key in enumerate(sample_keys):
        for g in range(generations):
            gen = keyed_generator(objective.seed, key, "cond-gap-x_T", g)
            out[i, g] = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return out


def cond_gap_values(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    sample_keys: Sequence[SampleKey],
    shape: Sequence[int],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    config: CondGapConfig | None = None,
) -> torch.Tensor:
    """``[n, S, G]`` norms ‖ε_c − ε_u‖₂ per sample, measured step and generation (float64 CPU).

    Args:
        objective: Supplies the noise schedule, prediction type and draw seed.
        model: A text-conditional UNet (``encoder_hidden_states`` keyword).
        sample_keys: One key per caption.
        shape: ``(C, H, W)`` of one sample in diffusion space.
        cond: ``[n, seq, dim]`` caption embeddings.
        uncond: ``[1, seq, dim]`` or ``[seq, dim]`` embedding of the empty caption.
        config: Steps, generations, guidance, dtype, device.
    """
    config = config or CondGapConfig()
    keys = list(sample_keys)
    if cond.shape[0] != len(keys):
        raise ValueError(f"{cond.shape[0]} caption embeddings but {len(keys)} sample keys")
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    # prediction_type="epsilon": the guided prediction handed to step() is already ε.
    ddim = DDIMScheduler.from_config(objective.scheduler.config, prediction_type="epsilon")
    ddim.set_timesteps(config.inference_steps)
    steps = ddim.timesteps[: config.measure_steps]
    n, g = len(keys), config.generations
    x = initial_noise(objective, keys, g, shape).reshape(n * g, *shape)
    x = x.to(dtype=dtype, device=device)
    c = cond.to(dtype=dtype, device=device).repeat_interleave(g, dim=0)
    u = uncond.reshape(1, *uncond.shape[-2:]).to(dtype=dtype, device=device)
    norms = torch.empty((len(steps), n * g), dtype=torch.float64)
    with scoring_mode(net), torch.no_grad():
        for s_idx, t in enumerate(steps):
            eps_hat = torch.empty_like(x)
            for s in range(0, n * g, config.batch_items):
                sl = slice(s, s + config.batch_items)
                xb = x[sl]
                tb = torch.full((xb.shape[0],), int(t), device=device, dtype=torch.long)
                out_c = net(xb, tb, encoder_hidden_states=c[sl]).sample
                out_u = net(xb, tb, encoder_hidden_states=u.expand(xb.shape[0], -1, -1)).sample
                eps_c = objective.epsilon_from_output(out_c, xb, tb)
                eps_u = objective.epsilon_from_output(out_u, xb, tb)
                gap = eps_c - eps_u
                norms[s_idx, sl] = gap.flatten(1).norm(dim=1).to("cpu", torch.float64)
                eps_hat[sl] = eps_u + config.guidance_scale * gap
            if s_idx + 1 < len(steps):
                x = ddim.step(eps_hat, t, x, eta=0.0).prev_sample
    if not torch.isfinite(norms).all():
        raise FloatingPointError("non-finite noise predictions in the cond-gap signal")
    return norms.reshape(len(steps), n, g).permute(1, 0, 2).contiguous()


def cond_gap_scores(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    cond: torch.Tensor | None,
    uncond: torch.Tensor | None,
    config: CondGapConfig | None = None,
) -> ScoreResult:
    """Risk = mean ‖ε_θ(x_t, e_caption) − ε_θ(x_t, e_∅)‖₂ over generations and first steps.

    Args:
        objective: Noise schedule, prediction type, seed (and VAE: ``images`` only give n).
        model: A text-conditional UNet.
        images: ``[n, ...]``; only the count is used (the signal depends on the caption).
        sample_keys: One key per sample.
        cond: ``[n, seq, dim]`` caption embeddings (required).
        uncond: Embedding of the empty caption (required).
        config: See :class:`CondGapConfig`.
    """
    if cond is None or uncond is None:
        raise ValueError(
            "the cond-gap signal needs caption embeddings and the empty-caption embedding: it is "
            "defined for text-conditional models only"
        )
    config = config or CondGapConfig()
    if images.shape[0] != len(sample_keys):
        raise ValueError(f"{images.shape[0]} images but {len(sample_keys)} sample keys")
    unet_config = model.config
    size = unet_config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(unet_config.in_channels), int(h), int(w))
    values = cond_gap_values(objective, model, sample_keys, shape, cond, uncond, config)
    n, s, g = values.shape
    schedule = TimestepSchedule(
        timesteps=sampler_timesteps(objective, config), draws_per_sample=config.generations
    )
    return summarise(values.reshape(n, s * g, 1), schedule, sample_keys, "cond-gap/ddim")
