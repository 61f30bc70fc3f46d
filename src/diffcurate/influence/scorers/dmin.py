"""``dmin``: gradient sketches for attribution (seed 002) as a :class:`Scorer` (no risk mode)."""

from __future__ import annotations

from typing import Literal

from diffusers import DDPMScheduler
from pydantic import BaseModel, Field

from diffcurate.influence.dmin import (
    NO_RISK_MODE,
    DMinConfig,
    evenly_spaced_timesteps,
    sketch_gradients,
)
from diffcurate.influence.objective import TimestepSchedule
from diffcurate.influence.scorers.base import (
    OPTIONS,
    BaseScorer,
    RunState,
    ScoreFn,
    SketchFn,
    Spec,
    default_of,
)

DMIN_TIMESTEPS = 10
"""DMin default: this many evenly spaced timesteps (the paper's 10 for its LoRA models)."""


class DMinOptions(BaseModel):
    """``dmin`` options (see :class:`~diffcurate.influence.dmin.DMinConfig`).

    ``n_timesteps`` evenly spaced timesteps unless the spec lists ``timesteps``. ``index``: the
    ANN index built on the sketches at the end of a run (``none``: exact search only).
    """

    model_config = OPTIONS
    sketch_dim: int = Field(default_of(DMinConfig, "sketch_dim"), ge=1)
    n_timesteps: int = Field(DMIN_TIMESTEPS, ge=1)
    noise: Literal["shared", "per_sample"] = default_of(DMinConfig, "noise")
    batch_size: int = Field(default_of(DMinConfig, "batch_size"), ge=1)
    index: Literal["ivf_hnsw_sq", "ivf_hnsw_flat", "hnsw_sq", "none"] = "ivf_hnsw_sq"


class DMinScorer(BaseScorer):
    """ "Scoring" writes L2-normalised, compressed per-timestep gradients to the ``sketches``
    table; ``diffcurate attribute`` searches them (ANN index or exact scan)."""

    name = "dmin"
    summary = "gradient sketches for `diffcurate attribute` (no risk scores)"
    options_model = DMinOptions
    options_key = "dmin"
    output = "sketches"

    def config(self, spec: Spec) -> DMinConfig:
        opts = spec.options
        return DMinConfig(
            sketch_dim=opts.sketch_dim, noise=opts.noise, batch_size=opts.batch_size,
            seed=spec.seed, dtype=spec.dtype, device=spec.device,
        )  # fmt: skip

    def timesteps(self, spec: Spec) -> tuple[int, ...]:
        """As given, else evenly spaced assuming 1000 training timesteps (:meth:`schedule`
        follows the scheduler)."""
        if spec.timesteps is not None:
            return spec.timesteps
        return evenly_spaced_timesteps(spec.options.n_timesteps)

    def schedule(self, spec: Spec, scheduler: DDPMScheduler) -> TimestepSchedule:
        timesteps = spec.timesteps
        if timesteps is None:
            total = int(scheduler.config.num_train_timesteps)
            timesteps = evenly_spaced_timesteps(min(spec.options.n_timesteps, total), total)
        return TimestepSchedule(timesteps=timesteps, draws_per_sample=spec.draws_per_timestep)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        raise ValueError(NO_RISK_MODE)

    def sketch(self, spec: Spec) -> SketchFn:
        cfg = self.config(spec)
        return lambda obj, model, x, keys, cond=None: sketch_gradients(
            obj, model, x, keys, cfg, cond
        )

    def sketch_dim(self, spec: Spec) -> int:
        return spec.options.sketch_dim

    def sketch_method(self, spec: Spec) -> str:
        return f"dmin/sketch{spec.options.sketch_dim}/{spec.options.noise}-noise"

    def sketch_index(self, spec: Spec) -> str:
        return spec.options.index
