"""``divergence``: the data-space Jacobian trace tr(∂ε_θ/∂x_t) as a :class:`Scorer`."""

from __future__ import annotations

from diffcurate.influence.data_space import DivergenceConfig, divergence_scores
from diffcurate.influence.scorers.base import BaseScorer, RunState, ScoreFn, Spec


class DivergenceScorer(BaseScorer):
    """Hutchinson estimate of the data-space divergence per sample.

    The default signal: best recall of planted exact and near duplicates at t=100
    (``benchmarks/results/risk_signals.md``).
    """

    name = "divergence"
    summary = "data-space Jacobian trace (the default)"
    default_timesteps = (100,)

    def config(self, spec: Spec) -> DivergenceConfig:
        return DivergenceConfig(
            probes=spec.probes, seed=spec.seed, dtype=spec.dtype, device=spec.device
        )

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        cfg = self.config(spec)
        return lambda obj, model, x, keys, cond=None, uncond=None: divergence_scores(
            obj, model, x, keys, cfg, cond
        )
