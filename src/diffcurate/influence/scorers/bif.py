"""``bif``: local Bayesian influence (seed 004) as a :class:`Scorer`: risk = posterior loss
variance (self-BIF), attribution = the BIF −Cov between query and training losses over the
draws, reported as Cov (HIGH = proponent, as every attribution scorer)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from diffcurate.digests import content_digest
from diffcurate.influence.bif import BIFConfig, bif_from_traces
from diffcurate.influence.bif_draws import PosteriorDraws
from diffcurate.influence.bif_replay import ReplayedDraws
from diffcurate.influence.objective import DTYPES, DiffusionObjective, SampleKey
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

STORED_STATES_LIMIT = 4 * 2**30
"""``bif.states="auto"`` stores the C·T states up to this many bytes on disk and replays beyond."""


class BIFOptions(BaseModel):
    """``bif`` options (see :class:`~diffcurate.influence.bif.BIFConfig`).

    ``states``: how shards get the posterior states. ``"stored"`` records all C·T states once
    (:class:`~diffcurate.influence.bif_draws.PosteriorDraws`: C·T·d numbers on disk, read by
    every shard); ``"replay"`` records only their digests and each shard replays the chains
    (:class:`~diffcurate.influence.bif_replay.ReplayedDraws`: disk independent of d, one chain
    replay per shard); ``"auto"`` stores while C·T·d numbers fit in
    :data:`STORED_STATES_LIMIT` (the reference model at the defaults: 1.05 GiB) and replays
    beyond (a Stable-Diffusion-size UNet would need 1.25 TiB). Stored is faster per sample at
    small d, replay is the only option at model scale (``benchmarks/results/bif_storage.md``).
    Same numbers either way (a replay verifies every state), so the choice is not part of a
    run's identity.
    """

    model_config = OPTIONS
    states: Literal["auto", "stored", "replay"] = "auto"
    step_size: float = Field(default_of(BIFConfig, "step_size"), gt=0)
    localization: float = Field(default_of(BIFConfig, "localization"), ge=0)
    nbeta: float = Field(default_of(BIFConfig, "nbeta"), ge=0)
    chains: int = Field(default_of(BIFConfig, "chains"), ge=1)
    draws: int = Field(default_of(BIFConfig, "draws"), ge=1)
    burn_in: int = Field(default_of(BIFConfig, "burn_in"), ge=0)
    thinning: int = Field(default_of(BIFConfig, "thinning"), ge=1)
    batch_size: int = Field(default_of(BIFConfig, "batch_size"), ge=1)
    gradient_draws: Literal["fresh", "keyed"] = default_of(BIFConfig, "gradient_draws")
    batch_items: int = Field(default_of(BIFConfig, "batch_items"), ge=1)

    def states_for(self, n_params: int, itemsize: int) -> Literal["stored", "replay"]:
        """``states`` with ``"auto"`` resolved for d = ``n_params`` numbers of ``itemsize``."""
        if self.states != "auto":
            return self.states
        stored = self.chains * self.draws * n_params * itemsize
        return "stored" if stored <= STORED_STATES_LIMIT else "replay"

    @model_validator(mode="after")
    def _enough_draws(self) -> BIFOptions:
        if self.chains * self.draws < 2:
            raise ValueError("bif needs at least 2 posterior draws (chains × draws) for a variance")
        return self


class BIFScorer(BaseScorer):
    """The chains run once per run on the fit set (the SGLD set); their states (stored) or
    only their digests (replay) are kept under ``cache_dir/bif/<fingerprint>`` or
    ``cache_dir/bif-replay/<fingerprint>``, and every shard's losses are evaluated at the same
    C·T draws, so scores do not depend on shard boundaries."""

    name = "bif"
    summary = "posterior loss variance under localised SGLD (seed 004)"
    options_model = BIFOptions
    options_key = "bif"
    default_timesteps = (20,)
    needs = Needs(fit_set=True)
    memory_only = frozenset({"states"})
    attributes = True

    def config(self, spec: Spec) -> BIFConfig:
        return BIFConfig(
            **spec.options.model_dump(exclude={"states"}), seed=spec.seed, dtype=spec.dtype,
            device=spec.device,
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
        assert fit is not None and objective is not None and model is not None and cache_dir
        config = self.config(spec)
        name = content_digest(
            model,
            fit.images,
            list(fit.keys),
            fit.cond if fit.cond is not None else "no-cond",
            objective.seed,
            objective.schedule.model_dump(),
            dict(objective.scheduler.config),
            objective.vae is not None,
            config.model_dump(),
        )
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        states = spec.options.states_for(d, DTYPES[config.dtype].itemsize)
        record = PosteriorDraws.record if states == "stored" else ReplayedDraws.record
        folder = "bif" if states == "stored" else "bif-replay"
        posterior = record(
            objective, model, fit.images, fit.keys, config, cache_dir / folder / name, fit.cond
        )
        return RunState(fit=fit, cache_dir=cache_dir, posterior=posterior, embeddings=embeddings)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        posterior = needs_state(state, "posterior", self.name).posterior
        assert posterior is not None
        return lambda obj, model, x, keys, cond=None, uncond=None: posterior.risk(
            obj, model, x, keys, cond
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
        """Cov(ℓ_query, ℓ_train) = −BIF over the run's C·T draws (the estimator of
        :func:`~diffcurate.influence.bif.bif_attribution`, its ``scores`` sign: HIGH = the
        training sample helps the query), the query's losses evaluated once."""
        posterior = needs_state(state, "posterior", self.name).posterior
        assert posterior is not None
        q_traces = posterior.traces(objective, model, query, query_keys, query_cond)

        def shard(x: torch.Tensor, keys: Sequence[SampleKey], cond: torch.Tensor | None):
            traces = posterior.traces(objective, model, x, keys, cond)
            return -bif_from_traces(traces, q_traces)[0]

        return shard
