"""``global-hessian``: the minibatch Hessian trace baseline (seed 000 §4) as a :class:`Scorer`."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from diffcurate.influence.global_hessian import (
    GlobalHessianConfig,
    batch_order,
    global_hessian_risk,
)
from diffcurate.influence.scorers.base import (
    OPTIONS,
    BaseScorer,
    RunState,
    ScoreFn,
    Spec,
    default_of,
)


class GlobalHessianOptions(BaseModel):
    """``global-hessian`` options (see ``GlobalHessianConfig``)."""

    model_config = OPTIONS
    batch_size: int = Field(default_of(GlobalHessianConfig, "batch_size"), ge=1)
    probes: int = Field(default_of(GlobalHessianConfig, "probes"), ge=1)
    exact: bool = default_of(GlobalHessianConfig, "exact")


class GlobalHessianScorer(BaseScorer):
    """Scores minibatches, formed over the WHOLE dataset (seeded by id), so a sample's score
    does not depend on which shard it falls in; the flow cuts shards at batch boundaries."""

    name = "global-hessian"
    summary = "minibatch Hessian trace baseline (seed 000 section 4)"
    options_model = GlobalHessianOptions
    options_key = "global_hessian"
    default_timesteps = (20,)

    def config(self, spec: Spec) -> GlobalHessianConfig:
        return GlobalHessianConfig(
            **spec.options.model_dump(), seed=spec.seed, dtype=spec.dtype, device=spec.device
        )

    def units(self, sample_ids: Sequence[str], spec: Spec) -> list[list[str]]:
        ids = sorted(map(str, sample_ids))
        order = [ids[j] for j in batch_order(ids, spec.seed)]
        size = spec.options.batch_size
        return [order[s : s + size] for s in range(0, len(order), size)]

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        cfg = self.config(spec)
        return lambda obj, model, x, keys, cond=None, uncond=None: global_hessian_risk(
            obj, model, x, keys, cfg, cond
        )
