"""The ``trak`` and ``d-trak`` baselines: randomly projected gradients with an empirical-Fisher
kernel (Park et al. 2023, TRAK; Zheng et al. 2024, "Intriguing properties of data attribution on
diffusion models", D-TRAK).

What is computed
----------------
For a sample x with keyed (t, ε) draws j = 1..K, the *measurement* is

    TRAK    m(x; θ) = (1/K) Σ_j mean_D (f_θ(x_t^{(j)}, t_j) − y^{(j)})²   (the diffusion loss),
    D-TRAK  m(x; θ) = (1/K) Σ_j mean_D ε̂_θ(x_t^{(j)}, t_j)²            ("square": ‖ε_θ‖² / D),

where ε̂ is the network's noise prediction (for v-prediction models the ε implied by v̂, see
:meth:`DiffusionObjective.epsilon_from_output`). Its gradient g(x) = ∇_θ m(x; θ) ∈ R^d (the mean of
the per-draw gradients) is projected to k dimensions, φ(x) = Pᵀ g(x), by a seeded random matrix
P ∈ R^{d×k} with i.i.d. entries ±1/sqrt(k) (Rademacher) or N(0, 1/k) (Gaussian), so
E[P Pᵀ] = I and λ keeps its unprojected meaning. With Φ = [φ(x_1); …; φ(x_n)] the training
features (n × k), the attribution of training sample n to query q and the self-influence are

    τ(q, n) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_n),        s_n = φ(x_n)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_n),

ΦᵀΦ being the empirical Fisher (Gauss-Newton) kernel in projected space. Risk = self-influence
(HIGH = risky: a sample the kernel cannot explain from the others, a leverage score ≤ 1 when the
sample is part of Φ). As in D-TRAK's released code, one measurement function is used for the
training features, the kernel and the queries; TRAK's classification-specific Q = 1 − p weighting
does not apply to the diffusion loss, and we use a single model (TRAK's ensemble over M
checkpoints is the sum of M such scores).

Exactness. For k ≥ d and any P of full row rank, the push-through identity gives

    P (PᵀGᵀG P + λI)⁻¹ Pᵀ = (GᵀG + λ (PPᵀ)⁻¹)⁻¹,

so TRAK then equals the exact empirical-Fisher influence g_qᵀ (GᵀG + λI)⁻¹ g_n up to replacing λI
by λ(PPᵀ)⁻¹ ≈ λI (JL: PPᵀ → I as k grows); with GᵀG of full rank and λ → 0 both tend to
g_qᵀ (GᵀG)⁻¹ g_n. ``tests/influence/test_trak.py`` checks both statements against dense per-sample
gradients.

Projection. P is never stored whole for large models: it is generated in blocks of
``projection_block`` rows, block b from a CPU generator keyed by (seed, d, k, block size, b),
in float64 then cast (identical on CPU and CUDA), and cached while d·k ≤ ``projection_cache``
numbers. Queries and training samples must use the same seed, model and k.

Damping. ``damping=None`` (default) uses λ = 1e-3 × tr(ΦᵀΦ)/k (a thousandth of the kernel's mean
eigenvalue), which keeps the kernel invertible when n < k; TRAK's own default is λ = 0 (an exact
inverse, valid once n ≥ k), available as ``damping=0``. Default k = 2048 (the ``trak`` library's
``TRAKer`` default) with Rademacher entries; ``projection="gaussian"`` is what D-TRAK's released
code uses. The ``trak`` library leaves P unscaled and divides gradients by sqrt(d) instead; the
1/sqrt(k) scaling here only changes what a given λ means, not the method.

Timesteps: the objective's schedule decides the draws (D-TRAK uses K timesteps uniformly spaced
over [0, 1000)); every sample uses its own keyed (t, ε) draws, so features do not depend on batch
or shard composition. Streaming: features are per shard (``trak_features``); the kernel is the sum
of per-shard ΦᵀΦ (``fisher_kernel``), k × k regardless of corpus size.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    Mapper,
    SampleKey,
    ScoreResult,
    keyed_generator,
    map_items,
    on_device,
    resolve_device,
    scoring_mode,
    trainable_params,
)

Params = dict[str, torch.Tensor]
DEFAULT_RELATIVE_DAMPING = 1e-3


class TRAKConfig(BaseModel):
    """Configuration of TRAK / D-TRAK.

    Attributes:
        measurement: ``"loss"`` (TRAK: the diffusion loss) or ``"square"`` (D-TRAK: ‖ε_θ‖²/D).
        proj_dim: k, the projected dimension.
        projection: ``"rademacher"`` (±1/sqrt(k)) or ``"gaussian"`` (N(0, 1/k)) entries.
        damping: λ; None = 1e-3 × the kernel's mean eigenvalue (see module docstring).
        seed: Seed of the projection (the (t, ε) seed is the objective's).
        dtype: Working dtype of gradients and projection.
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: Samples per per-sample-gradient call (memory ≈ batch × draws × d).
        projection_block: Rows of P generated at a time.
        projection_cache: Keep P in memory while d·k is at most this many numbers.
        projection_buffer: Gradients (numbers, n·d) gathered before one pass over P's blocks:
            when P is not cached, each pass regenerates it, so projecting many samples per
            pass divides that cost. At least one ``batch_size`` batch is always projected.
        vectorize: ``torch.func.vmap`` over items (falls back to a loop without batching rules).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    measurement: Literal["loss", "square"] = "loss"
    proj_dim: int = Field(2048, ge=1)
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    damping: float | None = Field(None, ge=0)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(16, ge=1)
    projection_block: int = Field(65536, ge=1)
    projection_cache: int = Field(1 << 26, ge=0)
    projection_buffer: int = Field(1 << 28, ge=0)
    vectorize: bool = True

    @property
    def name(self) -> str:
        """``"trak"`` or ``"d-trak"``."""
        return "trak" if self.measurement == "loss" else "d-trak"


# ------------------------------------------------------------------------------ projection
@dataclass
class Projector:
    """The seeded random map g ↦ Pᵀ g from R^d to R^k (module docstring)."""

    n_params: int
    proj_dim: int
    kind: str
    seed: int
    block: int
    dtype: torch.dtype
    device: torch.device
    cache_limit: int
    _cache: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_config(cls, n_params: int, config: TRAKConfig) -> Projector:
        return cls(
            n_params=n_params,
            proj_dim=config.proj_dim,
            kind=config.projection,
            seed=config.seed,
            block=config.projection_block,
            dtype=DTYPES[config.dtype],
            device=resolve_device(config.device),
            cache_limit=config.projection_cache,
        )

    def _block(self, b: int) -> torch.Tensor:
        if b in self._cache:
            return self._cache[b]
        rows = min(self.block, self.n_params - b * self.block)
        key = f"trak/d{self.n_params}/k{self.proj_dim}/block{self.block}"
        gen = keyed_generator(self.seed, key, f"trak-projection-{self.kind}", b)
        shape = (rows, self.proj_dim)
        if self.kind == "rademacher":
            bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64)
            mat = (2 * bits - 1).to(torch.float64)
        else:
            mat = torch.randn(shape, generator=gen, dtype=torch.float64)
        mat = (mat / self.proj_dim**0.5).to(device=self.device, dtype=self.dtype)
        if self.n_params * self.proj_dim <= self.cache_limit:
            self._cache[b] = mat
        return mat

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``[b, d]`` gradients → ``[b, k]`` features (working dtype/device)."""
        if grads.shape[-1] != self.n_params:
            raise ValueError(f"gradients have {grads.shape[-1]} entries, expected {self.n_params}")
        out = torch.zeros((grads.shape[0], self.proj_dim), dtype=grads.dtype, device=grads.device)
        for b, start in enumerate(range(0, self.n_params, self.block)):
            out += grads[:, start : start + self.block] @ self._block(b).to(grads)
        return out

    def matrix(self) -> torch.Tensor:
        """The dense P ∈ R^{d×k} (tests and tiny models only)."""
        n_blocks = -(-self.n_params // self.block)
        return torch.cat([self._block(b) for b in range(n_blocks)])


# ------------------------------------------------------------------------------ gradients
def _measurement_item(
    objective: DiffusionObjective, net: torch.nn.Module, params: Params, measurement: str
) -> Callable[[Mapper], Callable[..., torch.Tensor]]:
    """Per-item flattened ∇_θ of the per-draw measurement (loss, or mean ε̂²)."""
    f = objective.network(net)

    def build(_mapper: Mapper) -> Callable[..., torch.Tensor]:
        def item(
            x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, y: torch.Tensor
        ) -> torch.Tensor:
            def value(p: Params) -> torch.Tensor:
                out = f(p, x_t, t, cond)
                if measurement == "loss":
                    return (out - y.reshape(-1)).square().mean()
                eps_hat = objective.epsilon_from_output(out, x_t.reshape(-1), t)
                return eps_hat.square().mean()

            g = grad(value)(params)
            return torch.cat([g[name].reshape(-1) for name in params])

        return item

    return build


def per_sample_gradients(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: TRAKConfig | None = None,
    cond: torch.Tensor | None = None,
    consume: Callable[[slice, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """∇_θ m(x_i) per sample, ``[n, d]`` (or streamed to ``consume(slice, grads)`` per batch).

    The gradient of the draw-mean measurement is the mean of per-draw gradients.
    """
    config = config or TRAKConfig()
    keys = list(sample_keys)
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} images but {len(keys)} sample keys")
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    parts: list[torch.Tensor] = []
    vectorize = config.vectorize
    with scoring_mode(net):
        params = trainable_params(net)
        if not params:
            raise ValueError("the model has no trainable parameters")
        d = sum(p.numel() for p in params.values())
        build = _measurement_item(objective, net, params, config.measurement)
        for start in range(0, len(keys), config.batch_size):
            sl = slice(start, min(start + config.batch_size, len(keys)))
            c = None if cond is None else cond[sl]
            batch = objective.prepare(images[sl], keys[sl], dtype, device, c)

            def args(isl: slice, batch=batch) -> tuple[object, ...]:
                return (batch.x_t[isl], batch.t[isl], batch.cond_at(isl), batch.target[isl])

            flat, vectorize = map_items(build, len(batch), args, len(batch), vectorize)
            grads = flat.reshape(batch.n_samples, batch.n_draws, d).mean(dim=1)
            finite = torch.isfinite(grads).all(dim=1).cpu()
            if not finite.all():
                bad = [keys[sl][i] for i in torch.nonzero(~finite).flatten().tolist()]
                raise FloatingPointError(f"non-finite {config.name} gradients for {bad[:10]}")
            if consume is None:
                parts.append(grads)
            else:
                consume(sl, grads)
    if consume is not None:
        return None
    return torch.cat(parts) if parts else torch.zeros((0, 0))


def trak_features(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: TRAKConfig | None = None,
    cond: torch.Tensor | None = None,
) -> np.ndarray:
    """Projected gradients φ(x_i) = Pᵀ ∇_θ m(x_i): ``[n, k]`` float64."""
    config = config or TRAKConfig()
    out = np.zeros((images.shape[0], config.proj_dim))
    state: dict[str, Projector] = {}
    pending: list[tuple[slice, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        grads = torch.cat([g for _, g in pending])
        if "p" not in state:
            state["p"] = Projector.from_config(grads.shape[1], config)
        feats = state["p"].project(grads).to(device="cpu", dtype=torch.float64).numpy()
        row = 0
        for sl, g in pending:
            out[sl] = feats[row : row + g.shape[0]]
            row += g.shape[0]
        pending.clear()

    def consume(sl: slice, grads: torch.Tensor) -> None:
        held = sum(g.numel() for _, g in pending)
        if pending and held + grads.numel() > config.projection_buffer:
            flush()
        pending.append((sl, grads))

    per_sample_gradients(objective, model, images, sample_keys, config, cond, consume)
    flush()
    return out


# ------------------------------------------------------------------------------ scores
def fisher_kernel(*feature_blocks: np.ndarray) -> np.ndarray:
    """ΦᵀΦ summed over feature blocks (shards): ``[k, k]`` float64."""
    if not feature_blocks:
        raise ValueError("no features")
    k = np.asarray(feature_blocks[0]).shape[1]
    out = np.zeros((k, k))
    for block in feature_blocks:
        arr = np.asarray(block, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != k:
            raise ValueError(f"expected features [n, {k}], got shape {arr.shape}")
        out += arr.T @ arr
    return out


def damping_value(kernel: np.ndarray, damping: float | None) -> float:
    """λ: as configured, or 1e-3 × tr(ΦᵀΦ)/k when None."""
    if damping is not None:
        return float(damping)
    return DEFAULT_RELATIVE_DAMPING * float(np.trace(kernel)) / kernel.shape[0]


def _solve(kernel: np.ndarray, damping: float | None, rhs: np.ndarray) -> np.ndarray:
    """(ΦᵀΦ + λI)⁻¹ rhs by Cholesky (a clear error if the damped kernel is singular)."""
    lam = damping_value(kernel, damping)
    mat = kernel + lam * np.eye(kernel.shape[0])
    try:
        chol = np.linalg.cholesky(mat)
    except np.linalg.LinAlgError as err:
        raise np.linalg.LinAlgError(
            f"ΦᵀΦ + λI is not positive definite (λ = {lam:g}); with fewer training samples than "
            "proj_dim use damping > 0 (or None)"
        ) from err
    y = np.linalg.solve(chol, rhs)
    return np.linalg.solve(chol.T, y)


def trak_scores(
    query_features: np.ndarray,
    train_features: np.ndarray,
    kernel: np.ndarray,
    damping: float | None = None,
) -> np.ndarray:
    """τ(q, n) = φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_n: ``[n_query, n_train]`` float64."""
    q = np.asarray(query_features, dtype=np.float64)
    t = np.asarray(train_features, dtype=np.float64)
    return _solve(kernel, damping, q.T).T @ t.T


def trak_self_influence(
    features: np.ndarray, kernel: np.ndarray, damping: float | None = None
) -> np.ndarray:
    """s_n = φ_nᵀ (ΦᵀΦ + λI)⁻¹ φ_n: ``[n]`` float64."""
    f = np.asarray(features, dtype=np.float64)
    return np.einsum("nk,kn->n", f, _solve(kernel, damping, f.T))


def trak_attribution(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor,
    query_keys: Sequence[SampleKey],
    config: TRAKConfig | None = None,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
) -> np.ndarray:
    """TRAK / D-TRAK attribution ``[n_query, n_train]`` (HIGH = the training image helps).

    The kernel is the training set's ΦᵀΦ. For a corpus in shards, compute ``trak_features`` per
    shard, ``fisher_kernel`` over all of them, then ``trak_scores``.
    """
    config = config or TRAKConfig()
    train = trak_features(objective, model, train_images, train_keys, config, train_cond)
    query = trak_features(objective, model, query_images, query_keys, config, query_cond)
    return trak_scores(query, train, fisher_kernel(train), config.damping)


def trak_risk(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: TRAKConfig | None = None,
    cond: torch.Tensor | None = None,
    *,
    kernel: np.ndarray | None = None,
) -> ScoreResult:
    """Risk = self-influence φ_nᵀ (ΦᵀΦ + λI)⁻¹ φ_n (HIGH = risky; ``stderr`` NaN).

    ``kernel`` is the corpus ΦᵀΦ (sum of ``fisher_kernel`` over every shard's features); by
    default the shard's own, which makes a shard's scores depend on its composition.
    """
    config = config or TRAKConfig()
    feats = trak_features(objective, model, images, sample_keys, config, cond)
    kern = fisher_kernel(feats) if kernel is None else np.asarray(kernel, dtype=np.float64)
    score = trak_self_influence(feats, kern, config.damping)
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=score,
        stderr=np.full(score.shape, np.nan),
        per_layer=None,
        layer_names=(),
        per_timestep=None,
        timesteps=objective.schedule.timesteps,
        method=f"{config.name}/self-influence/{config.projection}{config.proj_dim}",
    )
