"""Named risk signals behind one call signature, with measured default timesteps.

A :class:`ScorerSpec` is everything needed to reproduce a scoring run's numbers (signal,
timesteps, draws, probes, seeds, dtype, device); the flow stores it in the ledger.

Default timesteps come from the measurements in ``DESIGN.md`` on a 0.7M-parameter DDPM trained
on 8×8 digits with 10 images duplicated 30× among 800 (recall@1% of the duplicated images):
the parameter-space GGN trace is informative only at low noise (0.7 at t=20, 0.0 at t>=100);
the data-space divergence (0.9) and the per-sample loss (0.9) peak near t=100. The seed paper
gives no timestep at all, which is why a schedule is part of every spec.

Our own measurement (``benchmarks/risk_signals.py``, results in ``benchmarks/results/``)
agrees: trace finds exact duplicates only at t=20 (0.00 at t>=100). Divergence and loss at
t=100 tie on recall of the planted set (0.60/0.50 and 0.50/0.60 after 3,000/8,000 training
steps) and the loss is 13-27x cheaper, so the loss at t=100 is the default signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffcurate.influence.cond_gap import CondGapConfig, cond_gap_scores, sampler_timesteps
from diffcurate.influence.data_space import DivergenceConfig, divergence_scores
from diffcurate.influence.loss_signal import LossSignalConfig, loss_scores
from diffcurate.influence.objective import (
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    TimestepSchedule,
)
from diffcurate.influence.trace import TraceConfig, trace_scores

SignalName = Literal["trace", "divergence", "loss", "cond-gap"]
CONDITIONAL_ONLY: frozenset[str] = frozenset({"cond-gap"})
"""Signals defined only for text-conditional models (they need caption embeddings)."""

DEFAULT_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "trace": (20,),
    "divergence": (100,),
    "loss": (100,),
}


class ScorerSpec(BaseModel):
    """A risk signal and every setting that determines its numbers.

    Attributes:
        signal: ``trace`` (per-sample GGN trace, seed 000), ``divergence`` (data-space
            Jacobian trace), ``loss`` (negated per-sample diffusion loss) or ``cond-gap``
            (Wen et al.'s conditional-minus-unconditional noise magnitude; text-conditional
            models only).
        timesteps: Fixed timesteps to measure at; default per signal (see module docstring).
            Not used by ``cond-gap``, which measures along its own sampling trajectory.
        draws_per_timestep: ε draws per timestep and sample.
        probes: Hutchinson probes per draw (``trace`` and ``divergence``).
        seed: Seed of the (t, ε) draws and of the probes.
        dtype: Working precision.
        device: ``cpu`` or ``cuda``.
        generations: ``cond-gap``: initial noises per caption (Wen et al. use 4).
        inference_steps: ``cond-gap``: DDIM steps of the guided trajectory.
        measure_steps: ``cond-gap``: how many first steps are measured (1 = first only).
        guidance_scale: ``cond-gap``: classifier-free guidance weight of the trajectory.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: SignalName = "loss"
    timesteps: tuple[int, ...] | None = None
    draws_per_timestep: int = Field(2, ge=1)
    probes: int = Field(2, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    generations: int = Field(4, ge=1)
    inference_steps: int = Field(50, ge=1)
    measure_steps: int = Field(1, ge=1)
    guidance_scale: float = Field(7.5, ge=0.0)

    @model_validator(mode="after")
    def _timesteps_apply(self) -> ScorerSpec:
        if self.signal in CONDITIONAL_ONLY and self.timesteps is not None:
            raise ValueError(
                f"{self.signal} measures along its own sampling trajectory; set inference_steps "
                "and measure_steps instead of timesteps"
            )
        return self

    @property
    def effective_timesteps(self) -> tuple[int, ...]:
        """The timesteps used: as given, else the signal's measured default (``()`` for
        ``cond-gap``, whose timesteps follow from the scheduler, see :meth:`objective`)."""
        if self.signal in CONDITIONAL_ONLY:
            return ()
        return self.timesteps if self.timesteps is not None else DEFAULT_TIMESTEPS[self.signal]

    @property
    def cond_gap_config(self) -> CondGapConfig:
        return CondGapConfig(
            generations=self.generations,
            inference_steps=self.inference_steps,
            measure_steps=self.measure_steps,
            guidance_scale=self.guidance_scale,
            dtype=self.dtype,
            device=self.device,
        )

    def objective(
        self, scheduler: DDPMScheduler, vae: AutoencoderKL | None = None
    ) -> DiffusionObjective:
        """The objective this spec measures (for ``cond-gap``: its first sampler timesteps)."""
        if self.signal in CONDITIONAL_ONLY:
            probe = DiffusionObjective(
                scheduler, TimestepSchedule(timesteps=(0,)), seed=self.seed, vae=vae
            )
            timesteps = sampler_timesteps(probe, self.cond_gap_config)
            schedule = TimestepSchedule(timesteps=timesteps, draws_per_sample=self.generations)
        else:
            schedule = TimestepSchedule(
                timesteps=self.effective_timesteps, draws_per_sample=self.draws_per_timestep
            )
        return DiffusionObjective(scheduler, schedule, seed=self.seed, vae=vae)


class ScoreFn(Protocol):
    """One shard of images (+ caption embeddings for conditional models) → per-sample scores."""

    def __call__(
        self,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        images: torch.Tensor,
        sample_keys: Sequence[SampleKey],
        cond: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
    ) -> ScoreResult: ...


def score_function(spec: ScorerSpec) -> ScoreFn:
    """The function computing ``spec``'s signal on one shard of images."""
    common = {"dtype": spec.dtype, "device": spec.device}
    if spec.signal == "cond-gap":
        gap_cfg = spec.cond_gap_config
        return lambda obj, model, x, keys, cond=None, uncond=None: cond_gap_scores(
            obj, model, x, keys, cond, uncond, gap_cfg
        )
    if spec.signal == "trace":
        trace_cfg = TraceConfig(probes=spec.probes, seed=spec.seed, **common)
        return lambda obj, model, x, keys, cond=None, uncond=None: trace_scores(
            obj, model, x, keys, trace_cfg, cond
        )
    if spec.signal == "divergence":
        div_cfg = DivergenceConfig(probes=spec.probes, seed=spec.seed, **common)
        return lambda obj, model, x, keys, cond=None, uncond=None: divergence_scores(
            obj, model, x, keys, div_cfg, cond
        )
    loss_cfg = LossSignalConfig(**common)
    return lambda obj, model, x, keys, cond=None, uncond=None: loss_scores(
        obj, model, x, keys, loss_cfg, cond
    )
