"""``cond-gap``: Wen et al.'s conditional-minus-unconditional noise gap as a :class:`Scorer`."""

from __future__ import annotations

from diffusers import DDPMScheduler

from diffcurate.influence.cond_gap import CondGapConfig, cond_gap_scores, sampler_timesteps
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.scorers.base import BaseScorer, Needs, RunState, ScoreFn, Spec


class CondGapScorer(BaseScorer):
    """Measured along the guided DDIM trajectory's first steps, so it takes no timesteps; its
    settings are the spec's ``generations``, ``inference_steps``, ``measure_steps`` and
    ``guidance_scale`` (common fields, part of every run identity since they were added)."""

    name = "cond-gap"
    summary = "caption-conditional vs unconditional noise gap (text-conditional models)"
    needs = Needs(conditional=True, own_timesteps=True)

    def config(self, spec: Spec) -> CondGapConfig:
        return CondGapConfig(
            generations=spec.generations,
            inference_steps=spec.inference_steps,
            measure_steps=spec.measure_steps,
            guidance_scale=spec.guidance_scale,
            dtype=spec.dtype,
            device=spec.device,
        )

    def schedule(self, spec: Spec, scheduler: DDPMScheduler) -> TimestepSchedule:
        probe = DiffusionObjective(scheduler, TimestepSchedule(timesteps=(0,)), seed=spec.seed)
        timesteps = sampler_timesteps(probe, self.config(spec))
        return TimestepSchedule(timesteps=timesteps, draws_per_sample=spec.generations)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        cfg = self.config(spec)
        return lambda obj, model, x, keys, cond=None, uncond=None: cond_gap_scores(
            obj, model, x, keys, cond, uncond, cfg
        )
