"""``trak`` / ``d-trak``: projected-gradient influence as a :class:`Scorer` (risk =
self-influence against the run's kernel; attribution = pairwise)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from diffcurate.influence.objective import DiffusionObjective, SampleKey
from diffcurate.influence.scorers.base import (
    OPTIONS,
    AttributeFn,
    BaseScorer,
    EmbeddingState,
    FitSet,
    Needs,
    RunState,
    ScoreFn,
    Spec,
    default_of,
    needs_state,
)
from diffcurate.influence.trak import (
    TRAKConfig,
    fisher_kernel,
    trak_features,
    trak_risk,
    trak_scores,
)


class TRAKOptions(BaseModel):
    """``trak`` / ``d-trak`` options (see :class:`~diffcurate.influence.trak.TRAKConfig`)."""

    model_config = OPTIONS
    proj_dim: int = Field(default_of(TRAKConfig, "proj_dim"), ge=1)
    projection: Literal["rademacher", "gaussian"] = default_of(TRAKConfig, "projection")
    damping: float | None = Field(default_of(TRAKConfig, "damping"), ge=0)
    batch_size: int = Field(default_of(TRAKConfig, "batch_size"), ge=1)
    projection_cache: int = Field(default_of(TRAKConfig, "projection_cache"), ge=0)


class TRAKScorer(BaseScorer):
    """The kernel ΦᵀΦ of the fit set, scaled by n_dataset / n_fit (an unbiased estimate of the
    corpus kernel, exact when the fit set is the dataset), is computed once per run."""

    name = "trak"
    summary = "projected-gradient (TRAK) self-influence"
    options_model = TRAKOptions
    options_key = "trak"
    default_timesteps = (20,)
    needs = Needs(fit_set=True)
    memory_only = frozenset({"projection_cache"})
    attributes = True
    measurement: Literal["loss", "square"] = "loss"

    def config(self, spec: Spec) -> TRAKConfig:
        return TRAKConfig(
            measurement=self.measurement, **spec.options.model_dump(), seed=spec.seed,
            dtype=spec.dtype, device=spec.device,
        )  # fmt: skip

    def prepare(
        self,
        spec: Spec,
        objective: DiffusionObjective | None,
        model: torch.nn.Module | None,
        fit: FitSet | None,
        cache_dir: Path | None,
        embeddings: EmbeddingState | None,
    ) -> RunState:
        assert fit is not None and objective is not None and model is not None
        feats = trak_features(objective, model, fit.images, fit.keys, self.config(spec), fit.cond)
        kernel = fisher_kernel(feats) * (fit.n_dataset / len(fit.keys))
        return RunState(fit=fit, cache_dir=cache_dir, trak_kernel=kernel, embeddings=embeddings)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        kernel = needs_state(state, "trak_kernel", self.name).trak_kernel
        cfg = self.config(spec)
        return lambda obj, model, x, keys, cond=None, uncond=None: trak_risk(
            obj, model, x, keys, cfg, cond, kernel=kernel
        )

    def attribute(
        self,
        spec: Spec,
        state: RunState,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        query: torch.Tensor,
        query_keys: Sequence[SampleKey],
        query_cond: torch.Tensor | None,
    ) -> AttributeFn:
        kernel = needs_state(state, "trak_kernel", self.name).trak_kernel
        assert kernel is not None
        cfg = self.config(spec)
        q_feats = trak_features(objective, model, query, query_keys, cfg, query_cond)

        def shard(x: torch.Tensor, keys: Sequence[SampleKey], cond: torch.Tensor | None):
            feats = trak_features(objective, model, x, keys, cfg, cond)
            return trak_scores(q_feats, feats, kernel, spec.options.damping)

        return shard


class DTRAKScorer(TRAKScorer):
    """D-TRAK: the same with the squared-norm measurement instead of the loss."""

    name = "d-trak"
    summary = "projected-gradient (D-TRAK) self-influence"
    measurement = "square"
