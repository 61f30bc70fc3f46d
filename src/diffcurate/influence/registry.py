"""Named scorers behind one call signature, with measured default timesteps.

A :class:`ScorerSpec` is everything needed to reproduce a scoring run's numbers (signal,
timesteps, draws, probes, seeds, dtype, device, and the method's own options); the flow stores it
in the ledger.

Default timesteps come from the measurements in ``DESIGN.md`` on a 0.7M-parameter DDPM trained
on 8×8 digits with 10 images duplicated 30× among 800 (recall@1% of the duplicated images):
the parameter-space GGN trace is informative only at low noise (0.7 at t=20, 0.0 at t>=100);
the data-space divergence (0.9) and the per-sample loss (0.9) peak near t=100. The seed paper
gives no timestep at all, which is why a schedule is part of every spec.

Our own measurement (``benchmarks/risk_signals.py``, results in
``benchmarks/results/risk_signals.md``) agrees: trace finds exact duplicates only at t=20 (0.00
at t>=100). On the planted corpus with exact and sub-pixel near duplicates, the data-space
divergence at t=100 reaches recall@1% 0.80 (5/5 exact, 3/5 near), the loss at t=100 0.60 and the
trace at t=20 0.50, so the divergence at t=100 is the default signal. The loss is the cheap
alternative (about 13x cheaper, same exact-duplicate recall); on the earlier whole-pixel-shift
corpus divergence and loss tied (0.60/0.50 vs 0.50/0.60 after 3,000/8,000 steps).

Scorers beyond the per-sample signals (issue 4) and what they need besides a shard's images:

* ``ekfac``, ``bif``, ``trak``, ``d-trak`` need DATASET-level state: the EK-FAC curvature, the
  SGLD set driving the BIF chains, the TRAK kernel ΦᵀΦ. All three are computed from one *fit
  set*, a seeded sample of up to ``fit_size`` dataset samples (:func:`fit_sample`, keyed by
  sample id, so it depends only on the dataset's ids and the seed), once per run
  (:func:`prepare_state`); every shard is then scored against the same state, so results do not
  depend on shard boundaries.
* ``global-hessian`` scores minibatches: batches are formed over the whole dataset
  (:func:`batch_units`) and the flow cuts shards at batch boundaries.
* ``random`` and ``clip-knn`` need no model: ``random`` is keyed by sample id, ``clip-knn``
  reads the ingest-time CLIP image embeddings (reference = every sample of the dataset).
* ``dmin`` has no risk mode (:data:`~diffcurate.influence.dmin.NO_RISK_MODE`); "scoring" with it
  writes gradient sketches for attribution (:func:`sketch_function`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffcurate.influence.bif import BIFConfig
from diffcurate.influence.bif_draws import PosteriorDraws
from diffcurate.influence.bif_replay import ReplayedDraws
from diffcurate.influence.clip_knn import ClipKNNConfig, clip_knn_risk
from diffcurate.influence.cond_gap import CondGapConfig, cond_gap_scores, sampler_timesteps
from diffcurate.influence.data_space import DivergenceConfig, divergence_scores
from diffcurate.influence.dmin import DMinConfig, evenly_spaced_timesteps, sketch_gradients
from diffcurate.influence.ekfac import EKFACConfig, ekfac_self_influence
from diffcurate.influence.global_hessian import (
    GlobalHessianConfig,
    batch_order,
    global_hessian_risk,
)
from diffcurate.influence.loss_signal import LossSignalConfig, loss_scores
from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    TimestepSchedule,
    keyed_seed,
)
from diffcurate.influence.random_baseline import RandomConfig, random_risk
from diffcurate.influence.trace import TraceConfig, trace_scores
from diffcurate.influence.trak import TRAKConfig, fisher_kernel, trak_features, trak_risk

SignalName = Literal[
    "trace",
    "divergence",
    "loss",
    "cond-gap",
    "ekfac",
    "bif",
    "trak",
    "d-trak",
    "global-hessian",
    "random",
    "clip-knn",
    "dmin",
]
SIGNALS: tuple[str, ...] = SignalName.__args__  # type: ignore[attr-defined]
CONDITIONAL_ONLY: frozenset[str] = frozenset({"cond-gap"})
"""Signals defined only for text-conditional models (they need caption embeddings)."""
FIT_SET: frozenset[str] = frozenset({"ekfac", "bif", "trak", "d-trak"})
"""Scorers whose curvature / posterior / kernel is fitted once per run on a sample of the data."""
MODEL_FREE: frozenset[str] = frozenset({"random", "clip-knn"})
"""Scorers that use neither the model nor the images."""
ATTRIBUTION_ONLY: frozenset[str] = frozenset({"dmin"})
"""Scorers without a risk mode (they write sketches for ``diffcurate attribute``)."""
RISK_SIGNALS: tuple[str, ...] = tuple(s for s in SIGNALS if s not in ATTRIBUTION_ONLY)

DEFAULT_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "trace": (20,),
    "divergence": (100,),
    "loss": (100,),
    # Issue-4 scorers, measured with benchmarks/scorers.py (1,500-step digits-8px model,
    # 1 draw, fit set 128; benchmarks/results/scorers.md): recall@1% / median planted rank of
    # 810 at t = 20, 100, 300: ekfac 0.30/54, 0.00, 0.00/467; trak 0.30/81, 0.00,
    # 0.00/493; d-trak 0.10/77, 0.10/139, 0.10/232; bif 0.00/121, 0.00/533 (t=20, 100);
    # global-hessian 0.00 at 20 and 100 (a minibatch-level score). Like the GGN trace, the
    # gradient-based scores see duplication only at low noise, so t=20 for all of them.
    "ekfac": (20,),
    "bif": (20,),
    "trak": (20,),
    "d-trak": (20,),
    "global-hessian": (20,),
}
DMIN_TIMESTEPS = 10
"""DMin default: this many evenly spaced timesteps (the paper's 10 for its LoRA models)."""


def _default(model: type[BaseModel], name: str) -> Any:
    """A library config's default, so the options below never drift from it."""
    return model.model_fields[name].default


_OPTS = ConfigDict(frozen=True, extra="forbid")


class EKFACOptions(BaseModel):
    """``ekfac`` options (see :class:`~diffcurate.influence.ekfac.EKFACConfig`)."""

    model_config = _OPTS
    damping: float | None = Field(_default(EKFACConfig, "damping"), ge=0.0)
    fisher: Literal["mc", "exact"] = _default(EKFACConfig, "fisher")
    fisher_samples: int = Field(_default(EKFACConfig, "fisher_samples"), ge=1)
    train_batch_size: int = Field(_default(EKFACConfig, "train_batch_size"), ge=1)
    query_batch_size: int = Field(_default(EKFACConfig, "query_batch_size"), ge=1)
    int8_query: bool = _default(EKFACConfig, "int8_query")


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

    model_config = _OPTS
    states: Literal["auto", "stored", "replay"] = "auto"
    step_size: float = Field(_default(BIFConfig, "step_size"), gt=0)
    localization: float = Field(_default(BIFConfig, "localization"), ge=0)
    nbeta: float = Field(_default(BIFConfig, "nbeta"), ge=0)
    chains: int = Field(_default(BIFConfig, "chains"), ge=1)
    draws: int = Field(_default(BIFConfig, "draws"), ge=1)
    burn_in: int = Field(_default(BIFConfig, "burn_in"), ge=0)
    thinning: int = Field(_default(BIFConfig, "thinning"), ge=1)
    batch_size: int = Field(_default(BIFConfig, "batch_size"), ge=1)
    gradient_draws: Literal["fresh", "keyed"] = _default(BIFConfig, "gradient_draws")
    batch_items: int = Field(_default(BIFConfig, "batch_items"), ge=1)

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


class TRAKOptions(BaseModel):
    """``trak`` / ``d-trak`` options (see :class:`~diffcurate.influence.trak.TRAKConfig`)."""

    model_config = _OPTS
    proj_dim: int = Field(_default(TRAKConfig, "proj_dim"), ge=1)
    projection: Literal["rademacher", "gaussian"] = _default(TRAKConfig, "projection")
    damping: float | None = Field(_default(TRAKConfig, "damping"), ge=0)
    batch_size: int = Field(_default(TRAKConfig, "batch_size"), ge=1)
    projection_cache: int = Field(_default(TRAKConfig, "projection_cache"), ge=0)


class GlobalHessianOptions(BaseModel):
    """``global-hessian`` options (see ``GlobalHessianConfig``)."""

    model_config = _OPTS
    batch_size: int = Field(_default(GlobalHessianConfig, "batch_size"), ge=1)
    probes: int = Field(_default(GlobalHessianConfig, "probes"), ge=1)
    exact: bool = _default(GlobalHessianConfig, "exact")


class ClipKNNOptions(BaseModel):
    """``clip-knn`` options (see :class:`~diffcurate.influence.clip_knn.ClipKNNConfig`).

    ``secrets``: sample ids or keys of the dataset's secret/canary images (modes
    ``secret-max`` and ``secret-knn``).
    """

    model_config = _OPTS
    mode: Literal["duplicates", "secret-max", "secret-knn"] = _default(ClipKNNConfig, "mode")
    tau: float = Field(_default(ClipKNNConfig, "tau"), ge=-1.0, le=1.0)
    k: int = Field(_default(ClipKNNConfig, "k"), ge=1)
    secrets: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _secrets_for_secret_modes(self) -> ClipKNNOptions:
        if self.mode != "duplicates" and not self.secrets:
            raise ValueError(f"clip-knn mode {self.mode!r} needs secrets (sample ids or keys)")
        return self


class DMinOptions(BaseModel):
    """``dmin`` options (see :class:`~diffcurate.influence.dmin.DMinConfig`).

    ``n_timesteps`` evenly spaced timesteps unless the spec lists ``timesteps``. ``index``: the
    ANN index built on the sketches at the end of a run (``none``: exact search only).
    """

    model_config = _OPTS
    sketch_dim: int = Field(_default(DMinConfig, "sketch_dim"), ge=1)
    n_timesteps: int = Field(DMIN_TIMESTEPS, ge=1)
    noise: Literal["shared", "per_sample"] = _default(DMinConfig, "noise")
    batch_size: int = Field(_default(DMinConfig, "batch_size"), ge=1)
    index: Literal["ivf_hnsw_sq", "ivf_hnsw_flat", "hnsw_sq", "none"] = "ivf_hnsw_sq"


OPTION_FIELDS: dict[str, str] = {
    "ekfac": "ekfac",
    "bif": "bif",
    "trak": "trak",
    "d-trak": "trak",
    "global-hessian": "global_hessian",
    "clip-knn": "clip_knn",
    "dmin": "dmin",
}
"""Signal → the :class:`ScorerSpec` field holding its options."""
MEMORY_ONLY: frozenset[str] = frozenset({"projection_cache", "states"})
"""Options that trade memory (or disk) for time and change no number (not part of a run's
identity)."""


class ScorerSpec(BaseModel):
    """A scorer and every setting that determines its numbers.

    Attributes:
        signal: ``trace`` (per-sample GGN trace, seed 000), ``divergence`` (data-space
            Jacobian trace), ``loss`` (negated per-sample diffusion loss), ``cond-gap``
            (Wen et al.'s conditional-minus-unconditional noise magnitude; text-conditional
            models only), ``ekfac`` (EK-FAC self-influence, seeds 001/003), ``bif`` (posterior
            loss variance under localised SGLD, seed 004), ``trak`` / ``d-trak`` (projected-
            gradient self-influence), ``global-hessian`` (minibatch Hessian trace, seed 000 §4),
            ``random``, ``clip-knn`` (CLIP-embedding near-duplicates or secret neighbours) or
            ``dmin`` (gradient sketches for attribution; no risk scores).
        timesteps: Fixed timesteps to measure at; default per signal (see module docstring).
            Not used by ``cond-gap``, which measures along its own sampling trajectory, nor by
            the model-free ``random`` and ``clip-knn``.
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
        fit_size: ``ekfac``/``bif``/``trak``/``d-trak``: samples in the fit set (curvature,
            SGLD set, kernel): a seeded sample of the dataset, all of it when smaller.
        ekfac, bif, trak, global_hessian, clip_knn, dmin: the method's own options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: SignalName = "divergence"
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
    ekfac: EKFACOptions = Field(default_factory=EKFACOptions)
    bif: BIFOptions = Field(default_factory=BIFOptions)
    trak: TRAKOptions = Field(default_factory=TRAKOptions)
    global_hessian: GlobalHessianOptions = Field(default_factory=GlobalHessianOptions)
    clip_knn: ClipKNNOptions = Field(default_factory=ClipKNNOptions)
    dmin: DMinOptions = Field(default_factory=DMinOptions)

    @model_validator(mode="after")
    def _timesteps_apply(self) -> ScorerSpec:
        if self.signal in CONDITIONAL_ONLY and self.timesteps is not None:
            raise ValueError(
                f"{self.signal} measures along its own sampling trajectory; set inference_steps "
                "and measure_steps instead of timesteps"
            )
        if self.signal in MODEL_FREE and self.timesteps is not None:
            raise ValueError(f"{self.signal} uses no model, so timesteps do not apply")
        return self

    # ------------------------------------------------------------------------- identity
    @property
    def uses_model(self) -> bool:
        return self.signal not in MODEL_FREE

    @property
    def is_risk(self) -> bool:
        """False for attribution-only scorers (``dmin``)."""
        return self.signal not in ATTRIBUTION_ONLY

    @property
    def options(self) -> BaseModel | None:
        """The signal's own options, or None for signals configured by the common fields."""
        name = OPTION_FIELDS.get(self.signal)
        return None if name is None else getattr(self, name)

    def fingerprint_payload(self) -> dict[str, Any]:
        """What identifies a run's numbers: the common fields, the resolved timesteps, and only
        THIS signal's options (plus ``fit_size`` where a fit set is used). For the per-sample
        signals this is exactly the payload of earlier versions, so their runs still resume."""
        payload = self.model_dump(mode="json", exclude={"fit_size", *set(OPTION_FIELDS.values())})
        payload["timesteps"] = list(self.effective_timesteps)
        if self.signal in FIT_SET:
            payload["fit_size"] = self.fit_size
        if self.options is not None:
            payload[OPTION_FIELDS[self.signal]] = self.options.model_dump(
                mode="json", exclude=MEMORY_ONLY
            )
        return payload

    @property
    def effective_timesteps(self) -> tuple[int, ...]:
        """The timesteps used: as given, else the signal's measured default (``()`` for
        ``cond-gap``, whose timesteps follow from the scheduler, see :meth:`objective`, and for
        the model-free signals; ``dmin``'s evenly spaced default assumes 1000 training
        timesteps here and follows the scheduler in :meth:`objective`)."""
        if self.signal in CONDITIONAL_ONLY or self.signal in MODEL_FREE:
            return ()
        if self.timesteps is not None:
            return self.timesteps
        if self.signal == "dmin":
            return evenly_spaced_timesteps(self.dmin.n_timesteps)
        return DEFAULT_TIMESTEPS[self.signal]

    # --------------------------------------------------------------------- library configs
    @property
    def cond_gap_config(self) -> CondGapConfig:
        return CondGapConfig(
            generations=self.generations,
            inference_steps=self.inference_steps,
            measure_steps=self.measure_steps,
            guidance_scale=self.guidance_scale,
            dtype=self.dtype,
            device=self.device,
        )

    def _common(self) -> dict[str, Any]:
        return {"seed": self.seed, "dtype": self.dtype, "device": self.device}

    @property
    def ekfac_config(self) -> EKFACConfig:
        return EKFACConfig(**self.ekfac.model_dump(), **self._common())

    @property
    def bif_config(self) -> BIFConfig:
        return BIFConfig(**self.bif.model_dump(exclude={"states"}), **self._common())

    @property
    def trak_config(self) -> TRAKConfig:
        measurement = "square" if self.signal == "d-trak" else "loss"
        return TRAKConfig(measurement=measurement, **self.trak.model_dump(), **self._common())

    @property
    def global_hessian_config(self) -> GlobalHessianConfig:
        return GlobalHessianConfig(**self.global_hessian.model_dump(), **self._common())

    @property
    def clip_knn_config(self) -> ClipKNNConfig:
        opts = self.clip_knn
        return ClipKNNConfig(mode=opts.mode, tau=opts.tau, k=opts.k)

    @property
    def dmin_config(self) -> DMinConfig:
        opts = self.dmin
        return DMinConfig(
            sketch_dim=opts.sketch_dim,
            noise=opts.noise,
            batch_size=opts.batch_size,
            **self._common(),
        )

    def objective(
        self, scheduler: DDPMScheduler, vae: AutoencoderKL | None = None
    ) -> DiffusionObjective:
        """The objective this spec measures (for ``cond-gap``: its first sampler timesteps)."""
        if self.signal in MODEL_FREE:
            raise ValueError(f"{self.signal} uses no model and has no diffusion objective")
        if self.signal in CONDITIONAL_ONLY:
            probe = DiffusionObjective(
                scheduler, TimestepSchedule(timesteps=(0,)), seed=self.seed, vae=vae
            )
            timesteps = sampler_timesteps(probe, self.cond_gap_config)
            schedule = TimestepSchedule(timesteps=timesteps, draws_per_sample=self.generations)
        else:
            timesteps = self.effective_timesteps
            if self.signal == "dmin" and self.timesteps is None:
                total = int(scheduler.config.num_train_timesteps)
                timesteps = evenly_spaced_timesteps(min(self.dmin.n_timesteps, total), total)
            schedule = TimestepSchedule(
                timesteps=timesteps, draws_per_sample=self.draws_per_timestep
            )
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
    """Units of work that must be scored together, in work order.

    ``global-hessian``: its minibatches, formed over the WHOLE dataset (seeded by id, see
    :func:`~diffcurate.influence.global_hessian.batch_order`), so a sample's score does not
    depend on which shard it falls in. Every other scorer: one sample per unit, sorted by id.
    """
    ids = sorted(map(str, sample_ids))
    if spec.signal != "global-hessian":
        return [[i] for i in ids]
    order = [ids[j] for j in batch_order(ids, spec.seed)]
    size = spec.global_hessian.batch_size
    return [order[s : s + size] for s in range(0, len(order), size)]


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
    """Dataset-level state of one run, computed once (:func:`prepare_state`), used by every shard.

    Attributes:
        fit: The fit set (``ekfac``, ``bif``, ``trak``, ``d-trak``).
        cache_dir: Where EK-FAC factors (``ekfac/``) and BIF chain states (``bif/``) are kept,
            named by fingerprints of everything they depend on.
        trak_kernel: ``trak``/``d-trak``: the fit set's ΦᵀΦ scaled by n_dataset / n_fit, an
            unbiased estimate of the corpus kernel (exact when the fit set is the dataset).
        posterior: ``bif``: the recorded SGLD states, or the digests the shards replay them to.
        embeddings: ``clip-knn``: reference and secret embeddings.
    """

    fit: FitSet | None = None
    cache_dir: Path | None = None
    trak_kernel: np.ndarray | None = None
    posterior: PosteriorDraws | ReplayedDraws | None = None
    embeddings: EmbeddingState | None = None

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


def _digest(*parts: object) -> str:
    """sha256 over models (state dict), tensors (bytes) and JSON-able values."""
    h = hashlib.sha256()

    def tensor(t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, value in sorted(part.state_dict().items()):
                h.update(name.encode())
                tensor(value)
        elif isinstance(part, torch.Tensor):
            tensor(part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:24]


def prepare_state(
    spec: ScorerSpec,
    objective: DiffusionObjective | None,
    model: torch.nn.Module | None,
    fit: FitSet | None,
    cache_dir: str | Path | None,
    embeddings: EmbeddingState | None = None,
) -> RunState:
    """Compute a run's dataset-level state once (deterministic in the spec, model and fit set).

    ``ekfac``: the factors of ``fit``, fitted here and cached under ``cache_dir/ekfac`` by
    kronfluence's fingerprint (every shard, and later runs with the same inputs, reuse them).
    ``trak``: projected gradients of the fit set → kernel. ``bif``: the chains, run once here;
    their states (``bif.states`` stored) or only their digests (replay) are kept under
    ``cache_dir/bif/<fingerprint>`` or ``cache_dir/bif-replay/<fingerprint>``.
    """
    cache = None if cache_dir is None else Path(cache_dir)
    if spec.signal in FIT_SET:
        if fit is None or objective is None or model is None:
            raise ValueError(f"{spec.signal} needs a model, an objective and a fit set")
        if cache is None:
            raise ValueError(f"{spec.signal} needs a cache directory for its dataset-level state")
    if spec.signal == "clip-knn" and embeddings is None:
        raise ValueError("clip-knn needs the dataset's CLIP image embeddings")
    kernel = posterior = None
    if spec.signal == "ekfac":
        assert fit is not None and objective is not None and model is not None and cache
        # kronfluence has no fit-only call: scoring one fit sample fits and caches the factors.
        ekfac_self_influence(
            objective, model, fit.images[:1], fit.keys[:1], spec.ekfac_config, cache / "ekfac",
            None if fit.cond is None else fit.cond[:1],
            fit_images=fit.images, fit_keys=fit.keys, fit_cond=fit.cond,
        )  # fmt: skip
    elif spec.signal in ("trak", "d-trak"):
        assert fit is not None and objective is not None and model is not None
        config = spec.trak_config
        feats = trak_features(objective, model, fit.images, fit.keys, config, fit.cond)
        kernel = fisher_kernel(feats) * (fit.n_dataset / len(fit.keys))
    elif spec.signal == "bif":
        assert fit is not None and objective is not None and model is not None and cache
        config = spec.bif_config
        name = _digest(
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
        states = spec.bif.states_for(d, DTYPES[config.dtype].itemsize)
        record = PosteriorDraws.record if states == "stored" else ReplayedDraws.record
        folder = "bif" if states == "stored" else "bif-replay"
        posterior = record(
            objective, model, fit.images, fit.keys, config, cache / folder / name, fit.cond
        )
    return RunState(
        fit=fit, cache_dir=cache, trak_kernel=kernel, posterior=posterior, embeddings=embeddings
    )


# ----------------------------------------------------------------------------- scoring
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


def _needs(state: RunState | None, what: str, signal: str) -> RunState:
    if state is None or getattr(state, what) is None:
        raise ValueError(f"{signal} scores shards against run-level state: call prepare_state")
    return state


def score_function(spec: ScorerSpec, state: RunState | None = None) -> ScoreFn:
    """The function computing ``spec``'s risk signal on one shard of images.

    ``state`` (from :func:`prepare_state`) is required by ``bif``, ``trak`` and ``d-trak``; for
    ``ekfac`` it is optional (without it the shard is its own curvature set, as the library's
    default). Model-free scorers: see :func:`score_keys`.
    """
    common = {"dtype": spec.dtype, "device": spec.device}
    signal = spec.signal
    if signal in ATTRIBUTION_ONLY:
        from diffcurate.influence.dmin import NO_RISK_MODE

        raise ValueError(NO_RISK_MODE)
    if signal in MODEL_FREE:
        return lambda obj, model, x, keys, cond=None, uncond=None: score_keys(spec, keys, state)
    if signal == "cond-gap":
        gap_cfg = spec.cond_gap_config
        return lambda obj, model, x, keys, cond=None, uncond=None: cond_gap_scores(
            obj, model, x, keys, cond, uncond, gap_cfg
        )
    if signal == "trace":
        trace_cfg = TraceConfig(probes=spec.probes, seed=spec.seed, **common)
        return lambda obj, model, x, keys, cond=None, uncond=None: trace_scores(
            obj, model, x, keys, trace_cfg, cond
        )
    if signal == "divergence":
        div_cfg = DivergenceConfig(probes=spec.probes, seed=spec.seed, **common)
        return lambda obj, model, x, keys, cond=None, uncond=None: divergence_scores(
            obj, model, x, keys, div_cfg, cond
        )
    if signal == "ekfac":
        ek_cfg = spec.ekfac_config
        fit = None if state is None else state.fit
        factors = None if state is None or state.cache_dir is None else state.cache_dir / "ekfac"

        def ekfac(obj, model, x, keys, cond=None, uncond=None):  # type: ignore[no-untyped-def]
            return ekfac_self_influence(
                obj, model, x, keys, ek_cfg, factors, cond,
                fit_images=None if fit is None else fit.images,
                fit_keys=None if fit is None else fit.keys,
                fit_cond=None if fit is None else fit.cond,
            )  # fmt: skip

        return ekfac
    if signal == "bif":
        posterior = _needs(state, "posterior", signal).posterior
        assert posterior is not None
        return lambda obj, model, x, keys, cond=None, uncond=None: posterior.risk(
            obj, model, x, keys, cond
        )
    if signal in ("trak", "d-trak"):
        kernel = _needs(state, "trak_kernel", signal).trak_kernel
        tr_cfg = spec.trak_config
        return lambda obj, model, x, keys, cond=None, uncond=None: trak_risk(
            obj, model, x, keys, tr_cfg, cond, kernel=kernel
        )
    if signal == "global-hessian":
        gh_cfg = spec.global_hessian_config
        return lambda obj, model, x, keys, cond=None, uncond=None: global_hessian_risk(
            obj, model, x, keys, gh_cfg, cond
        )
    loss_cfg = LossSignalConfig(**common)
    return lambda obj, model, x, keys, cond=None, uncond=None: loss_scores(
        obj, model, x, keys, loss_cfg, cond
    )


def score_keys(
    spec: ScorerSpec,
    sample_keys: Sequence[SampleKey],
    state: RunState | None = None,
    embeddings: np.ndarray | None = None,
) -> ScoreResult:
    """Model-free scorers on one shard: ``random`` (by id) and ``clip-knn`` (``embeddings`` of
    the shard, ``[n, d]``, against ``state.embeddings``; when ``embeddings`` is None they are
    looked up in the reference by key)."""
    if spec.signal == "random":
        return random_risk(sample_keys, RandomConfig(seed=spec.seed))
    if spec.signal != "clip-knn":
        raise ValueError(f"{spec.signal} needs a model and images: use score_function")
    emb = _needs(state, "embeddings", spec.signal).embeddings
    assert emb is not None
    if embeddings is None:
        row = {k: i for i, k in enumerate(emb.reference_keys)}
        missing = [k for k in sample_keys if str(k) not in row]
        if missing:
            raise KeyError(f"no embeddings for samples {missing[:5]}")
        embeddings = emb.reference[[row[str(k)] for k in sample_keys]]
    return clip_knn_risk(
        sample_keys, embeddings, spec.clip_knn_config,
        reference_keys=emb.reference_keys, reference_embeddings=emb.reference,
        secrets=emb.secrets,
    )  # fmt: skip


def sketch_function(spec: ScorerSpec):  # type: ignore[no-untyped-def]
    """``dmin``: (objective, model, images, keys, cond) → ``[n, T, v]`` float32 sketches."""
    if spec.signal != "dmin":
        raise ValueError(f"{spec.signal} writes no sketches")
    config = spec.dmin_config
    return lambda obj, model, x, keys, cond=None: sketch_gradients(
        obj, model, x, keys, config, cond
    )
