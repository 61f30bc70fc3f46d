"""The diffusion training objective with explicit, seeded (t, ε) draws per sample.

Every risk signal in :mod:`diffcurate.influence` is an expectation over the diffusion noise
process, estimated from a few (t, ε) draws per training sample. To make scores comparable between
samples, runs and shards, the draws are *common random numbers*: the draws for a sample depend
only on ``(seed, sample key, draw index)`` and never on which other samples share its batch or
shard. We get that by seeding a fresh ``torch.Generator`` per (sample, draw, stream) from a
cryptographic hash of those values, always on the CPU in float64, and only then casting to the
working dtype/device. CPU generation is slower than a device RNG but it is the only way the same
sample gets the same ε on CPU and CUDA, in float32 and float64.

Loss normalisation: for one draw the loss is ``mean((f(θ) - y)²)`` over the ``D`` elements of
one sample's network output (``F.mse_loss`` with ``reduction="mean"``, as in the diffusers
training scripts), where ``f`` is the network output (ε or v prediction) and ``y`` the matching
target. The per-sample loss is the mean of that over the sample's draws.

Timesteps: the seed paper never says at which diffusion timesteps the curvature is measured.
Measurements on our tiny DDPM (see ``DESIGN.md``, "Environment facts") show it matters more than
anything else: the parameter-space GGN trace separates duplicated images at t=20 but not at
t≥100, while the data-space divergence and the per-sample loss work best near t=100. So the
schedule is an explicit, required choice (:class:`TimestepSchedule`), never a hidden default.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

# The keyed RNG lives in the bottom layer; re-exported here, where the scorers import it.
from diffcurate.keyed import SampleKey as SampleKey
from diffcurate.keyed import keyed_generator as keyed_generator
from diffcurate.keyed import keyed_seed as keyed_seed

log = logging.getLogger(__name__)

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


def rademacher(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """i.i.d. ±1 entries (float64, CPU) from ``generator``."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(torch.float64)


def item_probes(
    seed: int,
    stream: str,
    keys: Sequence[SampleKey],
    draw_idx: Sequence[int],
    n_probes: int,
    dim: int,
) -> torch.Tensor:
    """Rademacher probes ``[items, n_probes, dim]`` (float64, CPU), one keyed set per item.

    Item m gets probes determined by ``(seed, keys[m], stream, draw_idx[m])`` only, so probes,
    like draws, do not depend on batch composition; and the first P of P' > P probes coincide.
    """
    rows = [
        rademacher((n_probes, dim), keyed_generator(seed, k, stream, j))
        for k, j in zip(keys, draw_idx, strict=True)
    ]
    return torch.stack(rows)


class TimestepSchedule(BaseModel):
    """Which diffusion timesteps a risk signal is measured at.

    Exactly one of ``timesteps`` (a fixed list) or ``band`` (uniform integers in ``[lo, hi)``)
    is set.

    * Fixed list: every listed timestep gets ``draws_per_sample`` ε draws, so a sample has
      ``len(timesteps) * draws_per_sample`` draws, grouped by timestep (draw ``j`` uses
      ``timesteps[j // draws_per_sample]``). Per-timestep parts of a score are then available.
    * Band: a sample has ``draws_per_sample`` draws, each with its own t ~ U{lo, …, hi-1}.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    timesteps: tuple[int, ...] | None = None
    band: tuple[int, int] | None = None
    draws_per_sample: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> TimestepSchedule:
        if (self.timesteps is None) == (self.band is None):
            raise ValueError("set exactly one of `timesteps` (fixed list) or `band` ([lo, hi))")
        if self.timesteps is not None:
            if not self.timesteps:
                raise ValueError("`timesteps` must not be empty")
            if min(self.timesteps) < 0:
                raise ValueError("timesteps must be >= 0")
        if self.band is not None and not 0 <= self.band[0] < self.band[1]:
            raise ValueError(f"band must satisfy 0 <= lo < hi, got {self.band}")
        return self

    @property
    def is_fixed(self) -> bool:
        """True for a fixed timestep list (per-timestep parts exist)."""
        return self.timesteps is not None

    @property
    def n_draws(self) -> int:
        """Number of (t, ε) draws per sample."""
        if self.timesteps is not None:
            return len(self.timesteps) * self.draws_per_sample
        return self.draws_per_sample

    @property
    def max_timestep(self) -> int:
        """Largest timestep the schedule can produce (to check against the scheduler)."""
        if self.timesteps is not None:
            return max(self.timesteps)
        assert self.band is not None
        return self.band[1] - 1

    def timestep_index(self) -> torch.Tensor | None:
        """For a fixed list: the index into ``timesteps`` of every draw, shape ``[n_draws]``."""
        if self.timesteps is None:
            return None
        return torch.arange(self.n_draws) // self.draws_per_sample


@dataclass(frozen=True)
class Draws:
    """The (t, ε) draws of a set of samples.

    Attributes:
        t: Long timesteps, shape ``[n, n_draws]`` (CPU).
        eps: Gaussian noise, shape ``[n, n_draws, *sample_shape]``, in the requested dtype/device.
    """

    t: torch.Tensor
    eps: torch.Tensor


@dataclass(frozen=True)
class DrawBatch:
    """Samples expanded over their draws into flat "items" (sample-major: item = i*K + j).

    Attributes:
        x_t: Noisy inputs ``[n*K, *shape]``.
        t: Timesteps ``[n*K]`` (long, on the working device).
        target: Regression targets ``[n*K, *shape]`` (ε or v).
        cond: Conditioning (``encoder_hidden_states``) ``[n*K, seq, dim]`` or None.
        n_samples: n.
        n_draws: K.
        sample_keys: The n sample keys (empty if built from bare tensors via ``expand``).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor | None
    n_samples: int
    n_draws: int
    sample_keys: tuple[SampleKey, ...] = ()

    @property
    def item_keys(self) -> list[SampleKey]:
        """The sample key of every item (probes are keyed by it)."""
        return [self.sample_keys[m // self.n_draws] for m in range(len(self))]

    @property
    def item_draws(self) -> list[int]:
        """The draw index of every item."""
        return [m % self.n_draws for m in range(len(self))]

    @property
    def dim(self) -> int:
        """D, the number of elements of one item (and of its network output)."""
        return self.x_t[0].numel()

    def __len__(self) -> int:
        return self.n_samples * self.n_draws

    def cond_at(self, sl: slice) -> torch.Tensor | None:
        """Conditioning of the items in ``sl`` (None for unconditional models)."""
        return None if self.cond is None else self.cond[sl]


NetworkFn = Callable[
    [dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor
]
"""``f(params, x_t, t, cond) -> flat output [D]`` for ONE item (no batch dimension)."""


class DiffusionObjective:
    """The ε- or v-prediction diffusion loss with per-sample common random numbers.

    Works with diffusers ``UNet2DModel`` (call ``model(x_t, t)``) and ``UNet2DConditionModel``
    (call ``model(x_t, t, encoder_hidden_states=cond)``) or any module with that call signature
    returning an object with a ``.sample`` tensor. In latent mode (``vae`` given), images are
    encoded with the VAE posterior *mean* (not a sample, so encoding is deterministic) times
    ``scaling_factor`` (after subtracting ``shift_factor`` where the VAE config defines one).

    Args:
        scheduler: Noise schedule; ``alphas_cumprod``/``add_noise``/``get_velocity`` are used
            and ``config.prediction_type`` decides the target.
        schedule: Timesteps to measure at (required: see the module docstring).
        seed: Run-level seed of the (t, ε) draws.
        vae: Optional ``AutoencoderKL`` for latent diffusion.
    """

    def __init__(
        self,
        scheduler: DDPMScheduler,
        schedule: TimestepSchedule,
        seed: int = 0,
        vae: AutoencoderKL | None = None,
    ) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; "
                f"expected one of {SUPPORTED_PREDICTION_TYPES}"
            )
        n_train = int(scheduler.config.num_train_timesteps)
        if schedule.max_timestep >= n_train:
            raise ValueError(
                f"schedule reaches t={schedule.max_timestep} but the scheduler has only "
                f"{n_train} training timesteps"
            )
        self.scheduler = scheduler
        self.schedule = schedule
        self.seed = int(seed)
        self.vae = vae

    @property
    def prediction_type(self) -> str:
        """``"epsilon"`` or ``"v_prediction"`` (from the scheduler config)."""
        return str(self.scheduler.config.prediction_type)

    # ----------------------------------------------------------------------------- inputs
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map images to the diffusion space x0 (identity without a VAE).

        Args:
            images: ``[n, C, H, W]`` in the range the model was trained on (usually [-1, 1]).

        Returns:
            x0: images, or ``(vae_mean - shift) * scaling_factor`` in latent mode.
        """
        if self.vae is None:
            return images
        vae_param = next(self.vae.parameters())
        mean = self.vae.encode(images.to(vae_param)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            mean = mean - shift
        return (mean * self.vae.config.scaling_factor).to(images)

    def draws(
        self,
        sample_keys: Sequence[SampleKey],
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Draws:
        """The (t, ε) draws of the given samples; each depends only on (seed, key, draw index).

        Args:
            sample_keys: One key per sample (sample ids, or stable dataset indices).
            shape: Shape of one sample in diffusion space (e.g. ``x0.shape[1:]``).
            dtype: Working dtype of ε (drawn in float64 then cast, so float32 ε is the rounded
                float64 ε).
            device: Working device of ε.

        Returns:
            :class:`Draws` with ``t`` of shape ``[n, K]`` and ``eps`` of shape ``[n, K, *shape]``.
        """
        n_draws = self.schedule.n_draws
        shape = tuple(int(s) for s in shape)
        t = torch.empty((len(sample_keys), n_draws), dtype=torch.long)
        eps = torch.empty((len(sample_keys), n_draws, *shape), dtype=torch.float64)
        fixed = self.schedule.timesteps
        for i, key in enumerate(sample_keys):
            for j in range(n_draws):
                if fixed is not None:
                    t[i, j] = fixed[j // self.schedule.draws_per_sample]
                else:
                    assert self.schedule.band is not None
                    lo, hi = self.schedule.band
                    gen_t = keyed_generator(self.seed, key, "t", j)
                    t[i, j] = torch.randint(lo, hi, (1,), generator=gen_t)[0]
                gen_e = keyed_generator(self.seed, key, "eps", j)
                eps[i, j] = torch.randn(shape, generator=gen_e, dtype=torch.float64)
        return Draws(t=t, eps=eps.to(dtype=dtype, device=device))

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε via ``scheduler.add_noise`` (batched over dim 0)."""
        return self.scheduler.add_noise(x0, eps, t.to(x0.device))

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The regression target: ε, or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 via ``get_velocity``."""
        if self.prediction_type == "epsilon":
            return eps
        return self.scheduler.get_velocity(x0, eps, t.to(x0.device))

    def expand(self, x0: torch.Tensor, draws: Draws, cond: torch.Tensor | None = None) -> DrawBatch:
        """Expand samples over their draws into flat items (see :class:`DrawBatch`)."""
        n, k = draws.t.shape
        if x0.shape[0] != n:
            raise ValueError(f"x0 has {x0.shape[0]} samples but draws cover {n}")
        x0_rep = x0.repeat_interleave(k, dim=0)
        t = draws.t.reshape(-1).to(x0.device)
        eps = draws.eps.reshape(n * k, *x0.shape[1:]).to(x0)
        cond_rep = None if cond is None else cond.to(x0).repeat_interleave(k, dim=0)
        return DrawBatch(
            x_t=self.noisy(x0_rep, t, eps),
            t=t,
            target=self.target(x0_rep, t, eps),
            cond=cond_rep,
            n_samples=n,
            n_draws=k,
        )

    # ----------------------------------------------------------------------------- network
    @staticmethod
    def model_output(
        model: torch.nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network prediction (ε or v) for a batch: ``model(x_t, t[, cond]).sample``."""
        if cond is None:
            return model(x_t, t).sample
        return model(x_t, t, encoder_hidden_states=cond).sample

    def network(self, model: torch.nn.Module) -> NetworkFn:
        """``f(params, x_t, t, cond)`` for ONE item, flattened to ``[D]``, via ``functional_call``.

        This is the function the trace differentiates: the per-draw loss is
        ``mean((f(θ) - target.flatten())²)``. A batch dimension of 1 is added inside so that
        diffusers models (which require 4-D input) can be ``vmap``-ed over items.
        """

        def f(
            params: dict[str, torch.Tensor],
            x_t: torch.Tensor,
            t: torch.Tensor,
            cond: torch.Tensor | None,
        ) -> torch.Tensor:
            kwargs = {} if cond is None else {"encoder_hidden_states": cond[None]}
            out = functional_call(model, params, (x_t[None], t[None]), kwargs)
            return out.sample.reshape(-1)

        return f

    def epsilon_from_output(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Convert a network output to the implied ε̂ (identity for ε-prediction).

        For v-prediction ε̂ = sqrt(ᾱ) v̂ + sqrt(1-ᾱ) x_t; that is linear in (v̂, x_t), so it can be
        differentiated w.r.t. x_t. ``t`` may be a scalar (one item) or a batch ``[B]``.
        """
        if self.prediction_type == "epsilon":
            return output
        alpha_bar = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[t]
        alpha_bar = alpha_bar.reshape(alpha_bar.shape + (1,) * (x_t.dim() - alpha_bar.dim()))
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * x_t

    def prepare(
        self,
        images: torch.Tensor,
        sample_keys: Sequence[SampleKey],
        dtype: torch.dtype,
        device: torch.device,
        cond: torch.Tensor | None = None,
    ) -> DrawBatch:
        """Encode, draw and expand: the inputs every scorer starts from.

        Args:
            images: ``[n, C, H, W]`` (pixel space; encoded by the VAE in latent mode).
            sample_keys: One stable key per image.
            dtype: Working dtype.
            device: Working device.
            cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]``.
        """
        keys = tuple(sample_keys)
        if images.shape[0] != len(keys):
            raise ValueError(f"{images.shape[0]} images but {len(keys)} sample keys")
        x0 = self.encode(images.to(device=device, dtype=dtype))
        draws = self.draws(keys, x0.shape[1:], dtype=dtype, device=device)
        c = None if cond is None else cond.to(device=device, dtype=dtype)
        batch = self.expand(x0, draws, c)
        return replace(batch, sample_keys=keys)

    def per_draw_loss(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        draws: Draws,
        cond: torch.Tensor | None = None,
        batch_items: int = 64,
    ) -> torch.Tensor:
        """Per-(sample, draw) loss ``mean((f - y)²)`` over elements, shape ``[n, K]``.

        Args:
            model: The denoiser (its dtype/device must match ``x0``).
            x0: Samples in diffusion space ``[n, *shape]``.
            draws: From :meth:`draws` for the same samples.
            cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]``.
            batch_items: Items per forward pass (memory bound only; results don't depend on it
                beyond float round-off).
        """
        return self.batch_loss(model, self.expand(x0, draws, cond), batch_items)

    def batch_loss(
        self, model: torch.nn.Module, batch: DrawBatch, batch_items: int = 64
    ) -> torch.Tensor:
        """Per-(sample, draw) loss ``[n, K]`` of an expanded :class:`DrawBatch`."""
        losses = []
        with torch.no_grad():
            for s in range(0, len(batch), batch_items):
                sl = slice(s, s + batch_items)
                out = self.model_output(model, batch.x_t[sl], batch.t[sl], batch.cond_at(sl))
                err = F.mse_loss(out, batch.target[sl], reduction="none")
                losses.append(err.flatten(1).mean(dim=1))
        return torch.cat(losses).reshape(batch.n_samples, batch.n_draws)


# --------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ScoreResult:
    """Per-sample scores of one signal (the common schema of every scorer here).

    Attributes:
        sample_keys: The samples, in input order.
        score: ``[n]`` mean estimate over draws (and probes). HIGH = risky for every signal.
        stderr: ``[n]`` standard error of ``score`` over the draw×probe estimates (NaN with a
            single estimate).
        per_layer: ``[n, L]`` or None; sums to ``score`` over the last axis.
        layer_names: Names of the L layers (owning module paths), empty without ``per_layer``.
        per_timestep: ``[n, T]`` or None; means per fixed timestep (``score`` is their mean).
        timesteps: The T timesteps of ``per_timestep``.
        method: How it was computed (e.g. ``"ggn/hutchinson/vmap"``), for provenance.
    """

    sample_keys: tuple[SampleKey, ...]
    score: np.ndarray
    stderr: np.ndarray
    per_layer: np.ndarray | None
    layer_names: tuple[str, ...]
    per_timestep: np.ndarray | None
    timesteps: tuple[int, ...] | None
    method: str

    @classmethod
    def concat(cls, parts: Sequence[ScoreResult]) -> ScoreResult:
        """Join shard results (same signal, method and layers) in order."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if (p.method, p.layer_names, p.timesteps) != (
                first.method,
                first.layer_names,
                first.timesteps,
            ):
                raise ValueError("cannot concatenate results of different signals/configurations")

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays, axis=0)

        return cls(
            sample_keys=tuple(k for p in parts for k in p.sample_keys),
            score=np.concatenate([p.score for p in parts]),
            stderr=np.concatenate([p.stderr for p in parts]),
            per_layer=cat("per_layer"),
            layer_names=first.layer_names,
            per_timestep=cat("per_timestep"),
            timesteps=first.timesteps,
            method=first.method,
        )


def summarise(
    estimates: torch.Tensor,
    schedule: TimestepSchedule,
    sample_keys: Sequence[SampleKey],
    method: str,
    per_layer: torch.Tensor | None = None,
    layer_names: Sequence[str] = (),
) -> ScoreResult:
    """Reduce per-(sample, draw, probe) estimates to a :class:`ScoreResult`.

    Args:
        estimates: ``[n, K, P]`` unbiased estimates (P = 1 for exact/deterministic signals).
        schedule: The schedule the K draws came from (for per-timestep parts).
        sample_keys: The n samples.
        method: Provenance string.
        per_layer: Optional ``[n, K, P, L]`` whose last axis sums to ``estimates``.
        layer_names: Names of the L layers.

    The standard error treats the K·P estimates of a sample as i.i.d. Draws and probes are
    independent, so this is right for a band schedule; for a fixed list it ignores the
    stratification by timestep and so slightly overstates the error (conservative).
    """
    n, k, p = estimates.shape
    finite = torch.isfinite(estimates.detach()).reshape(n, -1).all(dim=1).cpu()
    if not finite.all():
        bad = [sample_keys[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise FloatingPointError(f"non-finite {method} estimates for samples {bad[:10]}")
    flat = estimates.detach().to(torch.float64).reshape(n, k * p).cpu()
    score = flat.mean(dim=1)
    if k * p > 1:
        stderr = flat.std(dim=1, unbiased=True) / (k * p) ** 0.5
    else:
        stderr = torch.full((n,), float("nan"), dtype=torch.float64)
    layers = None
    if per_layer is not None:
        layers = per_layer.detach().to(torch.float64).cpu().mean(dim=(1, 2)).numpy()
    per_t = None
    if schedule.timesteps is not None:
        n_t = len(schedule.timesteps)
        grouped = estimates.detach().to(torch.float64).cpu().reshape(n, n_t, -1)
        per_t = grouped.mean(dim=2).numpy()
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=score.numpy(),
        stderr=stderr.numpy(),
        per_layer=layers,
        layer_names=tuple(layer_names) if per_layer is not None else (),
        per_timestep=per_t,
        timesteps=schedule.timesteps,
        method=method,
    )


# ------------------------------------------------------------------------------- execution
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (failing clearly when CUDA is asked for but absent)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def on_device(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``module`` itself if its parameters already have ``dtype``/``device``, else a moved copy.

    Why a copy: scorers must not silently change the caller's model (e.g. cast a training model
    to float64 behind its back).
    """
    first = next(module.parameters(), None)
    if first is None or (first.dtype == dtype and first.device == device):
        return module
    return copy.deepcopy(module).to(device=device, dtype=dtype)


@contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode plus the "math" scaled-dot-product-attention backend, restored afterwards.

    Why the math backend: the fused CPU flash-attention kernel has no ``vmap`` batching rule
    (functorch falls back to a slow per-item loop) and no double backward (so Hessian-vector
    products through diffusers attention fail). The math backend is composite, so it supports
    both; on CUDA it is slower than flash attention but exact.
    """
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was_training)


def trainable_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached trainable parameters by name (the θ the curvature is taken with respect to)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


Mapper = Callable[[Callable[..., object]], Callable[..., object]]
"""``vmap`` or :func:`loop_map`: maps a function over dim 0 of its tensor arguments."""


def loop_map(fn: Callable[..., object]) -> Callable[..., object]:
    """A ``vmap`` stand-in that loops in Python and stacks the outputs.

    Used when a module has no ``vmap`` support; tensor arguments are split along dim 0, other
    arguments (e.g. ``None`` conditioning) are passed through unchanged.
    """

    def mapped(*args: object) -> object:
        leaves, _ = tree_flatten(args)
        n = next(leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor))

        def pick(i: int) -> tuple[object, ...]:
            return tree_map(lambda a: a[i] if isinstance(a, torch.Tensor) else a, args)

        outs = [fn(*pick(i)) for i in range(n)]
        spec = tree_flatten(outs[0])[1]
        columns = zip(*(tree_flatten(o)[0] for o in outs), strict=True)
        return tree_unflatten([torch.stack(col) for col in columns], spec)

    return mapped


def map_items(
    build: Callable[[Mapper], Callable[..., torch.Tensor]],
    n_items: int,
    item_args: Callable[[slice], tuple[object, ...]],
    chunk: int,
    vectorize: bool,
) -> tuple[torch.Tensor, bool]:
    """Evaluate a per-item function over all items in chunks, vectorised where possible.

    Args:
        build: Given a mapper (``vmap`` or :func:`loop_map`) for inner maps (probes, basis
            vectors), returns the per-item function.
        n_items: Number of items.
        item_args: Arguments (batched along dim 0) of the items in a slice.
        chunk: Items per call (memory bound).
        vectorize: Try ``torch.func.vmap`` first.

    Returns:
        The concatenated per-item outputs and whether ``vmap`` was used. If ``vmap`` fails on
        the first chunk (e.g. an op without a batching rule) we warn and loop instead; a failure
        after the first chunk is re-raised, because mixing the two paths would make results
        depend on chunking.
    """
    use_vmap = vectorize
    outs: list[torch.Tensor] = []
    start = 0
    while start < n_items:
        args = item_args(slice(start, start + chunk))
        if use_vmap:
            try:
                in_dims = tuple(None if a is None else 0 for a in args)
                out = vmap(build(vmap), in_dims=in_dims)(*args)
            except (RuntimeError, NotImplementedError) as err:
                if start > 0:
                    raise
                log.warning("vmap failed (%s); falling back to a per-item loop", err)
                use_vmap = False
                continue
        else:
            out = loop_map(build(loop_map))(*args)
        outs.append(out)  # type: ignore[arg-type]
        start += chunk
    return torch.cat(outs), use_vmap
