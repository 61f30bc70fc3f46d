"""``random``: the keyed random baseline as a :class:`Scorer`."""

from __future__ import annotations

from diffcurate.influence.random_baseline import RandomConfig, random_risk
from diffcurate.influence.scorers.base import BaseScorer, KeyScoreFn, Needs, RunState, Spec


class RandomScorer(BaseScorer):
    """Scores keyed by (seed, sample id): no model, no images."""

    name = "random"
    summary = "random baseline"
    needs = Needs(model=False)

    def config(self, spec: Spec) -> RandomConfig:
        return RandomConfig(seed=spec.seed)

    def score_keys(self, spec: Spec, state: RunState | None) -> KeyScoreFn:
        cfg = self.config(spec)
        return lambda keys, embeddings=None: random_risk(keys, cfg)
