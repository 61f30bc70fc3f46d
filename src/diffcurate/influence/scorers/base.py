"""The scorer contract: what every method declares and implements, and the state it shares.

A scorer is one object per method name (:class:`Scorer`). The layers above ``influence/`` (the
flows, the shard tasks, ``diffcurate attribute``, the CLI, the benchmarks) only ever ask a
scorer what it needs and call its hooks, so adding a method is one adapter file plus one
``register_scorer`` call (see :mod:`diffcurate.influence.registry`).

Pure torch + numpy + pydantic: imports no storage or orchestration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from diffusers import DDPMScheduler
from pydantic import BaseModel, ConfigDict

from diffcurate.influence.objective import (
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    TimestepSchedule,
)

if TYPE_CHECKING:
    from diffcurate.influence.bif_draws import PosteriorDraws
    from diffcurate.influence.bif_replay import ReplayedDraws

OPTIONS = ConfigDict(frozen=True, extra="forbid")
"""Model config of every scorer's options model (frozen: options are part of a run's identity)."""


class Spec(Protocol):
    """What a scorer reads from a run's spec (:class:`~diffcurate.influence.registry.ScorerSpec`:
    the common fields and ``options``, an instance of the scorer's ``options_model``)."""

    signal: str
    timesteps: tuple[int, ...] | None
    draws_per_timestep: int
    probes: int
    seed: int
    dtype: Literal["float32", "float64"]
    device: Literal["cpu", "cuda"]
    generations: int
    inference_steps: int
    measure_steps: int
    guidance_scale: float
    fit_size: int
    options: Any


def default_of(model: type[BaseModel], name: str) -> Any:
    """A library config's default, so a scorer's options never drift from its algorithm's."""
    return model.model_fields[name].default


class NoOptions(BaseModel):
    """Options of a scorer configured entirely by the spec's common fields."""

    model_config = OPTIONS


@dataclass(frozen=True)
class Needs:
    """What a scorer needs besides a shard's sample ids.

    Attributes:
        model: The diffusion model and the shard's images (False: model-free scorers).
        fit_set: A seeded sample of the dataset, fitted once per run (curvature, posterior,
            kernel) before any shard is scored.
        embeddings: The dataset's ingest-time CLIP image embeddings.
        conditional: Only text-conditional models (the scorer needs caption embeddings).
        own_timesteps: The scorer measures along its own trajectory; fixed timesteps do not
            apply.
    """

    model: bool = True
    fit_set: bool = False
    embeddings: bool = False
    conditional: bool = False
    own_timesteps: bool = False


@dataclass(frozen=True)
class FitSet:
    """The fit set's images (in ``keys`` order), caption embeddings and the dataset size."""

    images: torch.Tensor
    keys: tuple[str, ...]
    n_dataset: int
    cond: torch.Tensor | None = None


@dataclass(frozen=True)
class EmbeddingState:
    """``clip-knn``: the reference corpus (every dataset sample) and the secret embeddings."""

    reference_keys: tuple[str, ...]
    reference: np.ndarray
    secrets: np.ndarray | None = None


@dataclass(frozen=True)
class RunState:
    """Dataset-level state of one run, computed once (``Scorer.prepare``), used by every shard.

    Pickled once per distributed run for the workers, so everything here must be picklable.

    Attributes:
        fit: The fit set (scorers with ``needs.fit_set``).
        cache_dir: Where fitted state too large to pickle is kept (EK-FAC factors under
            ``ekfac/``, BIF chain states under ``bif/``), named by fingerprints of its inputs.
        trak_kernel: ``trak``/``d-trak``: the fit set's ΦᵀΦ scaled by n_dataset / n_fit, an
            unbiased estimate of the corpus kernel (exact when the fit set is the dataset).
        posterior: ``bif``: the recorded SGLD states, or the digests the shards replay them to.
        embeddings: Scorers with ``needs.embeddings``: reference and secret embeddings.
        extra: Any other scorer's own picklable state.
    """

    fit: FitSet | None = None
    cache_dir: Path | None = None
    trak_kernel: np.ndarray | None = None
    posterior: PosteriorDraws | ReplayedDraws | None = None
    embeddings: EmbeddingState | None = None
    extra: Any = None

    def shared_bytes(self) -> tuple[int, int]:
        """``(disk, memory)`` bytes of the state every worker loads, beyond the model itself.

        Disk: the tensors of ``state.pt`` (fit set, kernel, embeddings) plus the BIF record's
        files. Memory: the same tensors plus what the BIF path holds while scoring (one state
        row for stored states; w*, gradients, noise and the SGLD set's draws for a replay).
        EK-FAC factor files are not counted.
        """
        tensors = 0
        if self.fit is not None:
            tensors += self.fit.images.nbytes
            tensors += 0 if self.fit.cond is None else self.fit.cond.nbytes
        if self.trak_kernel is not None:
            tensors += self.trak_kernel.nbytes
        if self.embeddings is not None:
            tensors += self.embeddings.reference.nbytes
            tensors += 0 if self.embeddings.secrets is None else self.embeddings.secrets.nbytes
        if self.posterior is None:
            return tensors, tensors
        return (
            tensors + self.posterior.disk_bytes(),
            tensors + self.posterior.memory_bytes(),
        )


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


KeyScoreFn = Callable[[Sequence[SampleKey], "np.ndarray | None"], ScoreResult]
"""Model-free scoring of one shard: (sample keys, the shard's embeddings or None) → scores."""

SketchFn = Callable[..., torch.Tensor]
"""(objective, model, images, keys, cond) → ``[n, T, v]`` float32 sketches."""

AttributeFn = Callable[[torch.Tensor, Sequence[SampleKey], "torch.Tensor | None"], np.ndarray]
"""One shard of training images, their keys and caption embeddings → ``[n_query, n_shard]``
influence of each training sample on each query (high = more influential)."""


@runtime_checkable
class Scorer(Protocol):
    """One scoring method: its options, defaults, needs and hooks.

    Attributes:
        name: The method's name (``--scorer``; the spec's ``signal``).
        summary: One line for help texts.
        options_model: The frozen pydantic model of the method's own options.
        options_key: Key of the options in run fingerprints (and in specs stored before the
            options union); None for scorers without options.
        default_timesteps: Measured default timesteps (``()`` where they do not apply).
        needs: What it needs (model, fit set, embeddings, conditional models).
        output: ``scores`` (a risk scorer) or ``sketches`` (attribution only: ``dmin``).
        memory_only: Options that trade memory or disk for time and change no number (kept
            out of a run's identity).
        attributes: Whether :meth:`attribute` answers ``diffcurate attribute`` queries (exact
            pairwise influence over the dataset); sketch scorers answer from their sketches.
    """

    name: str
    summary: str
    options_model: type[BaseModel]
    options_key: str | None
    default_timesteps: tuple[int, ...]
    needs: Needs
    output: Literal["scores", "sketches"]
    memory_only: frozenset[str]
    attributes: bool

    def config(self, spec: Spec) -> Any:
        """The algorithm's own config for ``spec`` (None when it has none)."""

    def timesteps(self, spec: Spec) -> tuple[int, ...]:
        """The timesteps ``spec`` measures at, before the scheduler is known."""

    def schedule(self, spec: Spec, scheduler: DDPMScheduler) -> TimestepSchedule:
        """The (t, ε) schedule of ``spec`` on a model with ``scheduler``."""

    def units(self, sample_ids: Sequence[str], spec: Spec) -> list[list[str]]:
        """Groups of sample ids scored together, in work order (sorted ids)."""

    def secrets(self, spec: Spec) -> tuple[str, ...]:
        """Sample ids or keys whose embeddings :meth:`prepare` gets as secrets."""

    def prepare(
        self,
        spec: Spec,
        objective: DiffusionObjective | None,
        model: torch.nn.Module | None,
        fit: FitSet | None,
        cache_dir: Path | None,
        embeddings: EmbeddingState | None,
    ) -> RunState:
        """Dataset-level state, computed once per run (deterministic in its inputs)."""

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        """The per-shard risk function (raises for attribution-only scorers)."""

    def score_keys(self, spec: Spec, state: RunState | None) -> KeyScoreFn:
        """Model-free scorers: the per-shard function of sample keys."""

    def sketch(self, spec: Spec) -> SketchFn:
        """``output == "sketches"``: the per-shard sketch function."""

    def sketch_dim(self, spec: Spec) -> int:
        """``output == "sketches"``: numbers per timestep of one sample's sketch."""

    def sketch_method(self, spec: Spec) -> str:
        """``output == "sketches"``: the method label of the run's summary."""

    def sketch_index(self, spec: Spec) -> str:
        """``output == "sketches"``: the ANN index built after the last shard (``none``)."""

    def attribute(
        self,
        spec: Spec,
        state: RunState,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        query: torch.Tensor,
        query_keys: Sequence[SampleKey],
        query_cond: torch.Tensor | None,
    ) -> AttributeFn | None:
        """Exact pairwise attribution of ``query`` over training shards, or None when the
        method does not attribute this way."""


class BaseScorer:
    """Defaults of the :class:`Scorer` hooks; adapters override what their method needs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions
    options_key: ClassVar[str | None] = None
    default_timesteps: ClassVar[tuple[int, ...]] = ()
    needs: ClassVar[Needs] = Needs()
    output: ClassVar[Literal["scores", "sketches"]] = "scores"
    memory_only: ClassVar[frozenset[str]] = frozenset()
    attributes: ClassVar[bool] = False

    def config(self, spec: Spec) -> Any:
        return None

    def timesteps(self, spec: Spec) -> tuple[int, ...]:
        if not self.needs.model or self.needs.own_timesteps:
            return ()
        return spec.timesteps if spec.timesteps is not None else self.default_timesteps

    def schedule(self, spec: Spec, scheduler: DDPMScheduler) -> TimestepSchedule:
        return TimestepSchedule(
            timesteps=self.timesteps(spec), draws_per_sample=spec.draws_per_timestep
        )

    def units(self, sample_ids: Sequence[str], spec: Spec) -> list[list[str]]:
        return [[i] for i in sorted(map(str, sample_ids))]

    def secrets(self, spec: Spec) -> tuple[str, ...]:
        return ()

    def prepare(
        self,
        spec: Spec,
        objective: DiffusionObjective | None,
        model: torch.nn.Module | None,
        fit: FitSet | None,
        cache_dir: Path | None,
        embeddings: EmbeddingState | None,
    ) -> RunState:
        return RunState(fit=fit, cache_dir=cache_dir, embeddings=embeddings)

    def risk(self, spec: Spec, state: RunState | None) -> ScoreFn:
        if not self.needs.model:
            keyed = self.score_keys(spec, state)
            return lambda obj, model, x, keys, cond=None, uncond=None: keyed(keys, None)
        raise ValueError(f"{self.name} has no risk mode")

    def score_keys(self, spec: Spec, state: RunState | None) -> KeyScoreFn:
        raise ValueError(f"{self.name} needs a model and images: use its risk function")

    def sketch(self, spec: Spec) -> SketchFn:
        raise ValueError(f"{self.name} writes no sketches")

    def sketch_dim(self, spec: Spec) -> int:
        raise ValueError(f"{self.name} writes no sketches")

    def sketch_method(self, spec: Spec) -> str:
        raise ValueError(f"{self.name} writes no sketches")

    def sketch_index(self, spec: Spec) -> str:
        return "none"

    def attribute(
        self,
        spec: Spec,
        state: RunState,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        query: torch.Tensor,
        query_keys: Sequence[SampleKey],
        query_cond: torch.Tensor | None,
    ) -> AttributeFn | None:
        return None


def needs_state(state: RunState | None, what: str, name: str) -> RunState:
    """``state`` with its ``what`` set, or a clear error naming the missing preparation."""
    if state is None or getattr(state, what) is None:
        raise ValueError(f"{name} scores shards against run-level state: call prepare_state")
    return state
