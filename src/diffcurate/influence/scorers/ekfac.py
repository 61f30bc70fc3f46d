"""``ekfac``: EK-FAC influence (seeds 001/003) as a :class:`Scorer`: risk = self-influence,
attribution = pairwise influence against the run's fit-set curvature."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from diffcurate.influence.ekfac import EKFACConfig, ekfac_attribution, ekfac_self_influence
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
)


class EKFACOptions(BaseModel):
    """``ekfac`` options (see :class:`~diffcurate.influence.ekfac.EKFACConfig`)."""

    model_config = OPTIONS
    damping: float | None = Field(default_of(EKFACConfig, "damping"), ge=0.0)
    fisher: Literal["mc", "exact"] = default_of(EKFACConfig, "fisher")
    fisher_samples: int = Field(default_of(EKFACConfig, "fisher_samples"), ge=1)
    train_batch_size: int = Field(default_of(EKFACConfig, "train_batch_size"), ge=1)
    query_batch_size: int = Field(default_of(EKFACConfig, "query_batch_size"), ge=1)
    int8_query: bool = default_of(EKFACConfig, "int8_query")


def _fit_kwargs(fit: FitSet | None) -> dict:
    return {
        "fit_images": None if fit is None else fit.images,
        "fit_keys": None if fit is None else fit.keys,
        "fit_cond": None if fit is None else fit.cond,
    }


class EKFACScorer(BaseScorer):
    """The factors are fitted once per run on the fit set and cached under
    ``cache_dir/ekfac`` by kronfluence's fingerprint, so every shard, later runs with the same
    inputs and ``diffcurate attribute`` reuse them."""

    name = "ekfac"
    summary = "EK-FAC self-influence (seeds 001/003)"
    options_model = EKFACOptions
    options_key = "ekfac"
    default_timesteps = (20,)
    needs = Needs(fit_set=True)
    attributes = True

    def config(self, spec: Spec) -> EKFACConfig:
        return EKFACConfig(
            **spec.options.model_dump(), seed=spec.seed, dtype=spec.dtype, device=spec.device
        )

    def prepare(
        self,
        spec: Spec,
        objective: DiffusionObjective | None,
        model: torch.nn.Module | None,
        fit: FitSet | None,
        cache_dir: Path | None,
        embeddings: EmbeddingState | None,
    ) -> RunState:
        assert fit is not None and objective is not None and model is not None and cache_dir
        # kronfluence has no fit-only call: scoring one fit sample fits and caches the factors.
        ekfac_self_influence(
            objective, model, fit.images[:1], fit.keys[:1], self.config(spec),
            cache_dir / "ekfac", None if fit.cond is None else fit.cond[:1], **_fit_kwargs(fit),
        )  # fmt: skip
        return RunState(fit=fit, cache_dir=cache_dir, embeddings=embeddings)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        """``state`` is optional: without it the shard is its own curvature set (the library's
        default)."""
        cfg = self.config(spec)
        fit = None if state is None else state.fit
        factors = None if state is None or state.cache_dir is None else state.cache_dir / "ekfac"

        def ekfac(obj, model, x, keys, cond=None, uncond=None):  # type: ignore[no-untyped-def]
            return ekfac_self_influence(obj, model, x, keys, cfg, factors, cond, **_fit_kwargs(fit))

        return ekfac

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
        cfg = self.config(spec)
        assert state.cache_dir is not None
        factors = state.cache_dir / "ekfac"

        def shard(x: torch.Tensor, keys: Sequence[SampleKey], cond: torch.Tensor | None):
            return ekfac_attribution(
                objective, model, x, keys, query, query_keys, cfg, factors, cond, query_cond,
                **_fit_kwargs(state.fit),
            )  # fmt: skip

        return shard
