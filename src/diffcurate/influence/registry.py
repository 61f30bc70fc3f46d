"""The scorer registry, keyed by name, and :class:`ScorerSpec`, a scoring run's full settings.

Every method is a :class:`~diffcurate.influence.scorers.base.Scorer` adapter (one file per
method in :mod:`diffcurate.influence.scorers`); this module registers them and routes the
generic calls (:func:`prepare_state`, :func:`score_function`, :func:`score_keys`,
:func:`sketch_function`, :func:`batch_units`) to the spec's scorer. Nothing above
``influence/`` switches on a scorer's name: the flows, tasks, CLI, ``diffcurate attribute``
and the benchmarks ask the scorer what it needs (:attr:`Scorer.needs`) and call its hooks.

A :class:`ScorerSpec` is everything needed to reproduce a scoring run's numbers: the common
fields (signal, timesteps, draws, probes, seeds, dtype, device, fit-set size, the ``cond-gap``
trajectory) and the method's own options, a union discriminated by ``signal`` (each scorer's
``options_model``; validated through the registry, so a scorer registered at run time gets its
options validated too). The flow stores the spec in the ledger.

Default timesteps are each scorer's ``default_timesteps``, measured on a 0.7M-parameter DDPM
trained on 8×8 digits with 10 images duplicated 30× among 800 (recall@1% of the duplicated
images, ``DESIGN.md``): the parameter-space GGN trace is informative only at low noise (0.7 at
t=20, 0.0 at t>=100); the data-space divergence (0.9) and the per-sample loss (0.9) peak near
t=100. The seed paper gives no timestep at all, which is why a schedule is part of every spec.
``benchmarks/risk_signals.py`` (``benchmarks/results/risk_signals.md``) agrees: on the planted
corpus with exact and sub-pixel near duplicates the divergence at t=100 reaches recall@1% 0.80,
the loss at t=100 0.60 and the trace at t=20 0.50, so the divergence is the default signal. The
gradient-based scorers (``ekfac``, ``bif``, ``trak``, ``d-trak``, ``global-hessian``), measured
with ``benchmarks/scorers.py`` (``benchmarks/results/scorers.md``), see duplication only at low
noise like the GGN trace, so t=20 for all of them.

Scorers with ``needs.fit_set`` (``ekfac``, ``bif``, ``trak``, ``d-trak``) compute their
DATASET-level state (EK-FAC curvature, SGLD set, TRAK kernel) from one *fit set*, a seeded
sample of up to ``fit_size`` dataset samples (:func:`fit_sample`, keyed by sample id, so it
depends only on the dataset's ids and the seed), once per run (:func:`prepare_state`); every
shard is then scored against the same state, so results do not depend on shard boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from diffcurate.influence.objective import (
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    keyed_seed,
)
from diffcurate.influence.scorers import BUILTIN
from diffcurate.influence.scorers.base import (
    EmbeddingState,
    FitSet,
    NoOptions,
    RunState,
    ScoreFn,
    Scorer,
)
from diffcurate.influence.scorers.bif import STORED_STATES_LIMIT, BIFOptions
from diffcurate.influence.scorers.clip_knn import ClipKNNOptions
from diffcurate.influence.scorers.dmin import DMIN_TIMESTEPS, DMinOptions
from diffcurate.influence.scorers.ekfac import EKFACOptions
from diffcurate.influence.scorers.global_hessian import GlobalHessianOptions
from diffcurate.influence.scorers.trak import TRAKOptions

__all__ = [
    "DMIN_TIMESTEPS",
    "STORED_STATES_LIMIT",
    "BIFOptions",
    "ClipKNNOptions",
    "DMinOptions",
    "EKFACOptions",
    "EmbeddingState",
    "FitSet",
    "GlobalHessianOptions",
    "RunState",
    "ScoreFn",
    "Scorer",
    "ScorerSpec",
    "TRAKOptions",
    "batch_units",
    "fit_sample",
    "get_scorer",
    "prepare_state",
    "register_scorer",
    "score_function",
    "score_keys",
    "scorer_names",
    "scorers",
    "sketch_function",
    "unregister_scorer",
]

_SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer, *, replace: bool = False) -> Scorer:
    """Make ``scorer`` available by its name to specs, flows, tasks, the CLI and attribution.

    Raises:
        ValueError: The name is taken (unless ``replace``) or the scorer lacks a hook.
    """
    if not isinstance(scorer, Scorer):
        raise ValueError(f"{scorer!r} does not implement the Scorer protocol")
    if scorer.name in _SCORERS and not replace:
        raise ValueError(f"a scorer named {scorer.name!r} is already registered")
    _SCORERS[scorer.name] = scorer
    return scorer


def unregister_scorer(name: str) -> None:
    """Remove a scorer (tests register toy scorers and remove them afterwards)."""
    _SCORERS.pop(name, None)


def get_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``.

    Raises:
        ValueError: No such scorer (the message lists the registered names).
    """
    try:
        return _SCORERS[name]
    except KeyError:
        raise ValueError(
            f"unknown signal {name!r}: no scorer of that name; use one of "
            f"{', '.join(scorer_names())}"
        ) from None


def scorers() -> tuple[Scorer, ...]:
    """Every registered scorer, built-ins first in ``--help`` order."""
    return tuple(_SCORERS.values())


def scorer_names(risk: bool | None = None) -> tuple[str, ...]:
    """Registered names; ``risk=True``: only risk scorers, ``False``: only sketch scorers."""
    return tuple(
        s.name for s in _SCORERS.values() if risk is None or (s.output == "scores") == risk
    )


def _options_keys() -> set[str]:
    return {s.options_key or s.name for s in _SCORERS.values() if _has_options(s)}


def _has_options(scorer: Scorer) -> bool:
    return bool(scorer.options_model.model_fields)


for _scorer in BUILTIN:
    register_scorer(_scorer)


class ScorerSpec(BaseModel):
    """A scorer and every setting that determines its numbers.

    Attributes:
        signal: The scorer's registered name (:func:`scorer_names`; ``--scorer``).
        timesteps: Fixed timesteps to measure at; default per scorer (its
            ``default_timesteps``). Not for scorers that follow their own trajectory
            (``cond-gap``) nor for model-free ones (``random``, ``clip-knn``).
        draws_per_timestep: ε draws per timestep and sample.
        probes: Hutchinson probes per draw (``trace`` and ``divergence``).
        seed: Seed of the (t, ε) draws, the probes, the fit set and every method's own
            randomness (MC Fisher targets, SGLD, projections, sketches, random scores).
        dtype: Working precision.
        device: ``cpu`` or ``cuda``.
        generations: ``cond-gap``: initial noises per caption (Wen et al. use 4).
        inference_steps: ``cond-gap``: DDIM steps of the guided trajectory.
        measure_steps: ``cond-gap``: how many first steps are measured (1 = first only).
        guidance_scale: ``cond-gap``: classifier-free guidance weight of the trajectory.
        fit_size: Scorers with a fit set: its size (a seeded sample of the dataset, all of it
            when smaller).
        options: The scorer's own options (its ``options_model``). Also accepted, and read
            from specs stored before the union: the options under the scorer's
            ``options_key`` (``ekfac=``, ``bif=``, ``trak=``, ``global_hessian=``,
            ``clip_knn=``, ``dmin=``); those of other scorers are ignored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: str = "divergence"
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
    fit_size: int = Field(512, ge=1)
    options: SerializeAsAny[BaseModel] = Field(default_factory=NoOptions)

    @model_validator(mode="before")
    @classmethod
    def _options_of_signal(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        scorer = get_scorer(data.get("signal", cls.model_fields["signal"].default))
        by_key = {k: data.pop(k) for k in _options_keys() if k in data}
        options = data.get("options")
        if options is None:
            options = by_key.get(scorer.options_key or scorer.name, {})
        if isinstance(options, BaseModel) and not isinstance(options, scorer.options_model):
            raise ValueError(
                f"{scorer.name} takes {scorer.options_model.__name__}, not {type(options).__name__}"
            )
        if not isinstance(options, BaseModel):
            options = scorer.options_model.model_validate(options)
        data["options"] = options
        return data

    @model_validator(mode="after")
    def _timesteps_apply(self) -> ScorerSpec:
        needs = self.scorer.needs
        if needs.own_timesteps and self.timesteps is not None:
            raise ValueError(
                f"{self.signal} measures along its own sampling trajectory; set inference_steps "
                "and measure_steps instead of timesteps"
            )
        if not needs.model and self.timesteps is not None:
            raise ValueError(f"{self.signal} uses no model, so timesteps do not apply")
        return self

    @classmethod
    def from_settings(cls, signal: str, settings: Mapping[str, Any]) -> ScorerSpec:
        """The spec of ``signal`` from flat settings (the CLI's flags and ``--option``s):
        common fields by name, every other key an option of the scorer (validated by its
        options model). A name that is both (``global-hessian``'s ``probes``) sets both."""
        fields = get_scorer(signal).options_model.model_fields
        common = set(cls.model_fields) - {"signal", "options"}
        options = {k: v for k, v in settings.items() if k not in common or k in fields}
        spec_fields = {k: v for k, v in settings.items() if k in common}
        return cls(signal=signal, options=options, **spec_fields)

    @property
    def scorer(self) -> Scorer:
        """The registered scorer this spec runs."""
        return get_scorer(self.signal)

    # ------------------------------------------------------------------------- identity
    @property
    def uses_model(self) -> bool:
        return self.scorer.needs.model

    @property
    def is_risk(self) -> bool:
        """False for attribution-only scorers (``dmin``)."""
        return self.scorer.output == "scores"

    def fingerprint_payload(self) -> dict[str, Any]:
        """What identifies a run's numbers: the common fields, the resolved timesteps, and only
        THIS scorer's options under its ``options_key`` (plus ``fit_size`` where a fit set is
        used), memory-only options left out. The same payload as when each scorer's options
        were a field of the spec, so earlier runs keep their identity and still resume."""
        scorer = self.scorer
        payload = self.model_dump(mode="json", exclude={"fit_size", "options"})
        payload["timesteps"] = list(self.effective_timesteps)
        if scorer.needs.fit_set:
            payload["fit_size"] = self.fit_size
        if _has_options(scorer):
            payload[scorer.options_key or scorer.name] = self.options.model_dump(
                mode="json", exclude=set(scorer.memory_only)
            )
        return payload

    @property
    def effective_timesteps(self) -> tuple[int, ...]:
        """The timesteps used as far as known without the scheduler (see
        :meth:`Scorer.timesteps`; :meth:`objective` has the final schedule)."""
        return self.scorer.timesteps(self)

    @property
    def config(self) -> Any:
        """The scorer's algorithm config (e.g. ``EKFACConfig``) for these settings."""
        return self.scorer.config(self)

    # Method-named spellings of :attr:`config`, for call sites that name the method anyway.
    cond_gap_config = ekfac_config = bif_config = trak_config = config
    global_hessian_config = clip_knn_config = dmin_config = config

    def objective(
        self, scheduler: DDPMScheduler, vae: AutoencoderKL | None = None
    ) -> DiffusionObjective:
        """The objective this spec measures (the scorer's schedule on ``scheduler``)."""
        if not self.uses_model:
            raise ValueError(f"{self.signal} uses no model and has no diffusion objective")
        schedule = self.scorer.schedule(self, scheduler)
        return DiffusionObjective(scheduler, schedule, seed=self.seed, vae=vae)


# ----------------------------------------------------------------------- dataset-level state
def fit_sample(sample_ids: Sequence[str], size: int, seed: int) -> list[str]:
    """The fit set: up to ``size`` ids chosen by a keyed hash of (seed, id), returned sorted.

    Depends only on the set of ids and the seed (not on their order or on shard boundaries);
    when the dataset grows, ids already chosen stay chosen unless displaced by a new id with a
    smaller hash.
    """
    ids = sorted(set(map(str, sample_ids)))
    if len(ids) <= size:
        return ids
    ranked = sorted(ids, key=lambda i: (keyed_seed(seed, i, "fit-set", 0), i))
    return sorted(ranked[:size])


def batch_units(sample_ids: Sequence[str], spec: ScorerSpec) -> list[list[str]]:
    """Units of work that must be scored together, in work order (:meth:`Scorer.units`: one
    sample per unit sorted by id, or ``global-hessian``'s dataset-wide minibatches)."""
    return spec.scorer.units(sample_ids, spec)


def prepare_state(
    spec: ScorerSpec,
    objective: DiffusionObjective | None,
    model: torch.nn.Module | None,
    fit: FitSet | None,
    cache_dir: str | Path | None,
    embeddings: EmbeddingState | None = None,
) -> RunState:
    """Compute a run's dataset-level state once (:meth:`Scorer.prepare`), after checking that
    what the scorer needs was given."""
    scorer = spec.scorer
    cache = None if cache_dir is None else Path(cache_dir)
    if scorer.needs.fit_set:
        if fit is None or objective is None or model is None:
            raise ValueError(f"{spec.signal} needs a model, an objective and a fit set")
        if cache is None:
            raise ValueError(f"{spec.signal} needs a cache directory for its dataset-level state")
    if scorer.needs.embeddings and embeddings is None:
        raise ValueError(f"{spec.signal} needs the dataset's CLIP image embeddings")
    return scorer.prepare(spec, objective, model, fit, cache, embeddings)


# ----------------------------------------------------------------------------- scoring
def score_function(spec: ScorerSpec, state: RunState | None = None) -> ScoreFn:
    """The function computing ``spec``'s risk signal on one shard of images
    (:meth:`Scorer.risk`; ``state`` from :func:`prepare_state` where the scorer needs one)."""
    return spec.scorer.risk(spec, state)


def score_keys(
    spec: ScorerSpec,
    sample_keys: Sequence[SampleKey],
    state: RunState | None = None,
    embeddings: np.ndarray | None = None,
) -> ScoreResult:
    """Model-free scorers on one shard (``embeddings`` of the shard, ``[n, d]``, where the
    scorer reads embeddings; None: looked up in ``state`` by key)."""
    return spec.scorer.score_keys(spec, state)(sample_keys, embeddings)


def sketch_function(spec: ScorerSpec):  # type: ignore[no-untyped-def]
    """Sketch scorers: (objective, model, images, keys, cond) → ``[n, T, v]`` sketches."""
    return spec.scorer.sketch(spec)
