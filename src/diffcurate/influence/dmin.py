"""DMin: per-timestep, L2-normalised, compressed per-sample gradients for attribution.

Seed 002 (Lin, Lao & Zhao, "DMin: Scalable Training Data Influence Estimation for Diffusion
Models") estimates the influence of a training pair X^i on a generated pair X^s by a first-order
(TracIn-style) expansion of the training updates, summed over timesteps (its eq. 7-9):

    I(X^s, X^i) = e·η̄ · Σ_t  ĝ_t(X^i) · ĝ_t(X^s),    ĝ_t(X) = g_t(X) / ‖g_t(X)‖₂,
    g_t(X) = ∇_θ L(f_θ(z_p, z_t, t), ε),   z_t the noisy latent of X at timestep t,

where the SAME noise ε is used for the query and the training sample at a timestep (eq. 3 noises
the query with the training sample's ε; eq. 7-8 share one ε). e·η̄ (epochs × mean learning rate)
is one positive constant that changes no ranking, so we drop it: the score is the sum over
timesteps of cosine similarities, in [-T, T].

Compression (§3.1, "Gradient Compression"), applied to each per-timestep gradient AFTER the L2
normalisation ("we apply L2 normalization to the gradient vector before compression"):

1. pad g ∈ R^L with zeros to L_pad = v·⌈L/v⌉, the smallest multiple of v;
2. permute by a random permutation π of [L_pad]:     y_i = g_pad[π(i)];
3. multiply by a Rademacher vector s ∈ {±1}^L_pad:  z_i = s_i · y_i;
4. group addition: split z into v groups of L_pad/v consecutive entries and sum each group,
   ĉ_b = Σ_{i = b·m}^{(b+1)·m - 1} z_i,  m = L_pad / v.

Only π (int, one per element) and s (one bit per element) are stored, never a v × L matrix. The
map is linear, ĉ = S g with S[b, π(i)] = s_i for i in group b (see
:meth:`SketchOperator.dense_matrix`), and unbiased for inner products: E⟨Sa, Sb⟩ = ⟨a, b⟩.
For unit a, b (the OPORP analysis the paper builds on, Li & Li 2023, with a uniform permutation):

    Var⟨Sa, Sb⟩ = (1 + ⟨a,b⟩² − 2 Σ_j a_j² b_j²) / v · (L_pad − v) / (L_pad − 1)  ≤  2 / v,

and for dense vectors (no coordinate carries a large share of the mass) the error is a
Rademacher chaos that concentrates sub-Gaussianly (Hanson-Wright), so
|⟨Sa, Sb⟩ − ⟨a, b⟩| ≤ c·sqrt(2/v) with probability ≈ 1 − 2e^(−c²/2): about ±0.13 for c = 6 at
the default v = 2^12. :func:`inner_product_std_bound` returns sqrt(2/v).

Where we make the paper's text concrete (no change of method):

* Step 4 says "divide the L_pad elements into L_pad/v groups, summing up the elements within each
  group to produce the compressed vector of dimension v". Summing within L_pad/v groups would
  give L_pad/v numbers, not v; we use v groups of L_pad/v consecutive entries (as OPORP and the
  authors' RapidIn code do). Because π is uniform, the transposed reading (v-strided groups) is
  the same random operator in distribution.
* The permutation is one uniform permutation of [L_pad] (RapidIn composes several structured
  shuffles to save memory; the DMin paper describes a single random permutation).
* Timesteps: the paper sub-samples a subset of {1..T} (10 timesteps for its LoRA models, 5 for
  SD3 full) without saying which; the objective's fixed :class:`TimestepSchedule` decides, and
  :func:`evenly_spaced_timesteps` gives an evenly spaced default. With ``draws_per_sample`` > 1
  the per-timestep gradient is the mean of the per-draw gradients at that timestep (the gradient
  of the Monte-Carlo loss at t), normalised once.
* Noise: ``noise="shared"`` (default, the paper's) draws ε for timestep slot j from the
  objective's seed and a fixed key, identical for every sample and query, so a query identical to
  a training image has identical gradients. ``noise="per_sample"`` uses the objective's
  per-sample keyed draws instead (still batch-invariant, but no longer the paper's estimator).
* A zero gradient (a sample the model fits exactly) has no direction; it is left at zero and
  contributes 0 to every score. Non-finite gradients raise ``FloatingPointError``.
* KNN: the paper concatenates the per-timestep sketches into one T·v vector for the KNN index,
  so one inner product is the full sum over timesteps; :mod:`diffcurate.storage.sketches` stores
  exactly that.

Risk: DMin is an ATTRIBUTION method. After normalisation a sample's similarity with itself is
T for every sample, and the paper motivates no per-sample memorization score (it evaluates
top-k detection rates of influential training samples only), so dmin has no risk mode
(:data:`NO_RISK_MODE` explains why for the CLI).

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    DrawBatch,
    Draws,
    Mapper,
    SampleKey,
    keyed_generator,
    map_items,
    on_device,
    rademacher,
    resolve_device,
    scoring_mode,
    trainable_params,
)

Params = dict[str, torch.Tensor]

SHARED_NOISE_KEY = "dmin/shared-noise"
"""The draw key of ``noise="shared"``: ε of timestep slot j depends on (objective seed, j) only."""

NO_RISK_MODE = (
    "dmin is an attribution method: after L2 normalisation every sample's self-similarity is "
    "the number of timesteps, and the DMin paper defines no per-sample risk score. Use "
    "`diffcurate attribute` with dmin, or a risk scorer (trace, loss, ekfac, bif)."
)


class DMinConfig(BaseModel):
    """Configuration of DMin gradient sketches.

    Attributes:
        sketch_dim: v, the compressed dimension per timestep (2^12 default, as the paper's
            cheapest setting; it also reports 2^16 and 2^20).
        seed: Seed of the permutation and Rademacher signs. Queries and training samples must
            use the same seed (and model) for their sketches to be comparable.
        normalise: L2-normalise each per-timestep gradient before compression (the paper's
            default; ``False`` reproduces its "w/o Norm." ablation).
        noise: ``"shared"`` (the paper's: the same ε for every sample at a timestep) or
            ``"per_sample"`` (the objective's keyed per-sample draws).
        dtype: Working dtype of the gradients (sketches are returned as float32).
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: Samples per vectorised gradient call; peak memory is about
            ``batch_size × draws × n_params`` working-dtype numbers (times ~3 while compressing).
        vectorize: ``torch.func.vmap`` over items (falls back to a loop without batching rules).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sketch_dim: int = Field(4096, ge=1)
    seed: int = 0
    normalise: bool = True
    noise: Literal["shared", "per_sample"] = "shared"
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(8, ge=1)
    vectorize: bool = True


def evenly_spaced_timesteps(n: int = 10, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """``n`` timesteps at the centres of ``n`` equal bins of ``[0, num_train_timesteps)``.

    The paper uses 10 timesteps (5 for SD3 full) without saying which; evenly spaced covers the
    whole noise range, where adjacent timesteps are highly correlated anyway (its §9).
    """
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"need 1 <= n <= {num_train_timesteps}, got {n}")
    width = num_train_timesteps / n
    return tuple(int(width * (k + 0.5)) for k in range(n))


def inner_product_std_bound(sketch_dim: int) -> float:
    """sqrt(2/v): an upper bound on the std of ⟨Sa, Sb⟩ − ⟨a, b⟩ for unit vectors a, b."""
    return math.sqrt(2.0 / sketch_dim)


# ------------------------------------------------------------------------------ compression
@dataclass(frozen=True)
class SketchOperator:
    """The random pad → permute → sign → group-sum map R^L → R^v of one (L, v, seed).

    Attributes:
        permutation: π, a permutation of ``range(padded_len)`` (long).
        signs: s ∈ {±1}^padded_len in the working dtype.
        n_params: L, the gradient length.
        sketch_dim: v.
    """

    permutation: torch.Tensor
    signs: torch.Tensor
    n_params: int
    sketch_dim: int

    @property
    def padded_len(self) -> int:
        """L_pad = v·⌈L/v⌉."""
        return int(self.permutation.numel())

    @property
    def group_size(self) -> int:
        """m = L_pad / v entries summed into each output coordinate."""
        return self.padded_len // self.sketch_dim

    @classmethod
    def create(
        cls,
        n_params: int,
        sketch_dim: int,
        seed: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SketchOperator:
        """π and s from CPU generators keyed by (seed, L, v): identical on every device."""
        if n_params < 1 or sketch_dim < 1:
            raise ValueError(
                f"need n_params >= 1 and sketch_dim >= 1, got {n_params}, {sketch_dim}"
            )
        padded = sketch_dim * math.ceil(n_params / sketch_dim)
        key = f"L{n_params}/v{sketch_dim}"
        perm = torch.randperm(padded, generator=keyed_generator(seed, key, "dmin-permutation", 0))
        signs = rademacher((padded,), keyed_generator(seed, key, "dmin-sign", 0))
        return cls(
            permutation=perm.to(device),
            signs=signs.to(device=device, dtype=dtype),
            n_params=int(n_params),
            sketch_dim=int(sketch_dim),
        )

    def dense_matrix(self) -> torch.Tensor:
        """S ∈ R^{v×L} with ``compress(g) == S @ g`` (tests and tiny models only)."""
        rows = torch.arange(self.padded_len, device=self.permutation.device) // self.group_size
        keep = self.permutation < self.n_params  # padding columns multiply zeros: drop them
        mat = torch.zeros(
            (self.sketch_dim, self.n_params), dtype=self.signs.dtype, device=self.signs.device
        )
        mat[rows[keep], self.permutation[keep]] = self.signs[keep]
        return mat

    def storage_bytes(self) -> int:
        """Bytes to persist the operator as the paper counts them: 4 per index + 1 bit per sign."""
        return 4 * self.padded_len + math.ceil(self.padded_len / 8)


def compress(grad_flat: torch.Tensor, operator: SketchOperator) -> torch.Tensor:
    """Compress ``[..., L]`` gradients to ``[..., v]`` sketches (pad → permute → sign → sum).

    Args:
        grad_flat: Flattened gradients, any leading batch shape; normalise BEFORE compressing.
        operator: The random map (same operator for queries and training samples).

    Returns:
        ``[..., v]`` in ``grad_flat``'s dtype.
    """
    if grad_flat.shape[-1] != operator.n_params:
        raise ValueError(
            f"gradient has {grad_flat.shape[-1]} entries but the operator was built for "
            f"{operator.n_params}"
        )
    padded = F.pad(grad_flat, (0, operator.padded_len - operator.n_params))  # (1) pad
    permuted = padded[..., operator.permutation]  # (2) y_i = g[π(i)]
    signed = permuted * operator.signs.to(grad_flat.dtype)  # (3) z_i = s_i·y_i
    groups = signed.reshape(*signed.shape[:-1], operator.sketch_dim, operator.group_size)
    return groups.sum(dim=-1)  # (4) ĉ_b = Σ of group b's m consecutive entries


# ------------------------------------------------------------------------------- gradients
def _draw_batch(
    objective: DiffusionObjective,
    images: torch.Tensor,
    keys: Sequence[SampleKey],
    dtype: torch.dtype,
    device: torch.device,
    cond: torch.Tensor | None,
    noise: str,
) -> DrawBatch:
    """Noisy inputs and targets per (sample, draw): shared or per-sample ε (see module doc)."""
    if noise == "per_sample":
        return objective.prepare(images, keys, dtype, device, cond)
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} images but {len(keys)} sample keys")
    x0 = objective.encode(images.to(device=device, dtype=dtype))
    one = objective.draws([SHARED_NOISE_KEY], x0.shape[1:], dtype=dtype, device=device)
    n = x0.shape[0]
    shared = Draws(
        t=one.t.expand(n, -1).contiguous(), eps=one.eps.expand(n, *one.eps.shape[1:]).contiguous()
    )
    c = None if cond is None else cond.to(device=device, dtype=dtype)
    return objective.expand(x0, shared, c)


def _grad_item(
    objective: DiffusionObjective, net: torch.nn.Module, params: Params
) -> Callable[[Mapper], Callable[..., torch.Tensor]]:
    """Per-item flattened ∇_θ mean((f − y)²), parameters in ``named_parameters`` order."""
    f = objective.network(net)

    def build(_mapper: Mapper) -> Callable[..., torch.Tensor]:
        def item(
            x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, y: torch.Tensor
        ) -> torch.Tensor:
            def loss(p: Params) -> torch.Tensor:
                return (f(p, x_t, t, cond) - y.reshape(-1)).square().mean()

            g = grad(loss)(params)
            return torch.cat([g[name].reshape(-1) for name in params])

        return item

    return build


def _require_fixed(objective: DiffusionObjective) -> tuple[int, ...]:
    timesteps = objective.schedule.timesteps
    if timesteps is None:
        raise ValueError(
            "dmin needs a fixed timestep list (sketches are compared timestep by timestep); "
            "use TimestepSchedule(timesteps=evenly_spaced_timesteps(...))"
        )
    return timesteps


def _gradient_chunks(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: DMinConfig,
    cond: torch.Tensor | None,
    consume: Callable[[slice, torch.Tensor], None],
    n_params_hook: Callable[[int, torch.dtype, torch.device], None] | None = None,
) -> None:
    """Compute ``[b, T, L]`` per-timestep gradients ``batch_size`` samples at a time.

    Each chunk is handed to ``consume(sample_slice, grads)`` and dropped, so peak memory is one
    chunk's gradients, not the shard's.
    """
    timesteps = _require_fixed(objective)
    keys = list(sample_keys)
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} images but {len(keys)} sample keys")
    n_t, per_t = len(timesteps), objective.schedule.draws_per_sample
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    vectorize = config.vectorize
    with scoring_mode(net):
        params = trainable_params(net)
        if not params:
            raise ValueError("the model has no trainable parameters")
        n_params = sum(p.numel() for p in params.values())
        if n_params_hook is not None:
            n_params_hook(n_params, dtype, device)
        build = _grad_item(objective, net, params)
        for start in range(0, len(keys), config.batch_size):
            sl = slice(start, min(start + config.batch_size, len(keys)))
            c = None if cond is None else cond[sl]
            batch = _draw_batch(objective, images[sl], keys[sl], dtype, device, c, config.noise)

            def args(isl: slice, batch: DrawBatch = batch) -> tuple[object, ...]:
                return (batch.x_t[isl], batch.t[isl], batch.cond_at(isl), batch.target[isl])

            flat, vectorize = map_items(build, len(batch), args, len(batch), vectorize)
            grads = flat.reshape(batch.n_samples, n_t, per_t, n_params).mean(dim=2)
            finite = torch.isfinite(grads).reshape(batch.n_samples, -1).all(dim=1).cpu()
            if not finite.all():
                bad = [keys[sl][i] for i in torch.nonzero(~finite).flatten().tolist()]
                raise FloatingPointError(f"non-finite dmin gradients for samples {bad[:10]}")
            if config.normalise:
                norms = grads.norm(dim=-1, keepdim=True)
                grads = torch.where(norms > 0, grads / norms.clamp_min(1e-300), grads)
            consume(sl, grads)


def per_timestep_gradients(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: DMinConfig | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uncompressed per-timestep per-sample gradients ``[n, T, L]`` (normalised if configured).

    For verification and exact mode on small models: memory is n·T·L numbers.
    """
    config = config or DMinConfig()
    parts: list[torch.Tensor] = []
    _gradient_chunks(
        objective, model, images, sample_keys, config, cond, lambda _sl, g: parts.append(g)
    )
    return torch.cat(parts)


def sketch_gradients(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: DMinConfig | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """DMin sketches ``[n, T, v]`` (float32, CPU) of per-timestep per-sample loss gradients.

    Args:
        objective: Loss, noise schedule, FIXED timesteps (required) and the ε seed.
        model: The denoiser (not modified: copied if dtype/device differ). Its trainable
            parameters are the θ of the gradients (freeze the base model to sketch adapters only,
            as the paper does for LoRA).
        images: ``[n, C, H, W]`` pixel-space images (encoded by the objective's VAE if any).
        sample_keys: One stable id per image (used for per-sample noise and error messages).
        config: Sketch dimension, operator seed, normalisation, noise mode, dtype, batch size.
        cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]`` (prompt embeddings).

    Returns:
        ``[n, T, v]`` float32: row ``[i, j]`` is S·ĝ_{t_j}(x_i); T follows the schedule's order.
        Sketches do not depend on ``batch_size`` or on which samples share a batch.
    """
    config = config or DMinConfig()
    n_t = len(_require_fixed(objective))
    out = torch.empty((images.shape[0], n_t, config.sketch_dim), dtype=torch.float32)
    state: dict[str, SketchOperator] = {}

    def make_operator(n_params: int, dtype: torch.dtype, device: torch.device) -> None:
        state["op"] = SketchOperator.create(n_params, config.sketch_dim, config.seed, dtype, device)

    def consume(sl: slice, grads: torch.Tensor) -> None:
        out[sl] = compress(grads, state["op"]).to(device="cpu", dtype=torch.float32)

    _gradient_chunks(objective, model, images, sample_keys, config, cond, consume, make_operator)
    return out


# ------------------------------------------------------------------------------ attribution
def attribution_scores(
    query_sketches: torch.Tensor | np.ndarray, train_sketches: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Σ_t ⟨q_t, x_t⟩ for every (query, training sample): ``[q, T, v] × [n, T, v] → [q, n]``.

    Works equally on sketches and on uncompressed ``[.., T, L]`` gradients. Float64 on CPU.
    """
    q = torch.as_tensor(query_sketches).to(device="cpu", dtype=torch.float64)
    x = torch.as_tensor(train_sketches).to(device="cpu", dtype=torch.float64)
    if q.dim() != 3 or x.dim() != 3 or q.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"expected [q, T, v] and [n, T, v] with the same T, v; got {tuple(q.shape)}, "
            f"{tuple(x.shape)}"
        )
    return torch.einsum("qtv,ntv->qn", q, x)


def exact_attribution(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor,
    query_keys: Sequence[SampleKey],
    config: DMinConfig | None = None,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (9) without compression: Σ_t ⟨ĝ_t(query), ĝ_t(train)⟩, ``[q, n]`` float64.

    Query gradients are held (q·T·L numbers); training gradients stream ``batch_size`` at a time.
    """
    config = config or DMinConfig()
    q_grads = per_timestep_gradients(objective, model, query_images, query_keys, config, query_cond)
    out = torch.empty((q_grads.shape[0], train_images.shape[0]), dtype=torch.float64)

    def consume(sl: slice, grads: torch.Tensor) -> None:
        out[:, sl] = attribution_scores(q_grads, grads)

    _gradient_chunks(objective, model, train_images, train_keys, config, train_cond, consume)
    return out


def attribute(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor,
    query_keys: Sequence[SampleKey],
    config: DMinConfig | None = None,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """Scorer-contract attribution ``[q, n]``: sketch inner products, or eq. (9) if ``exact``.

    For large training sets, store training sketches once (``storage.sketches``) and query the
    index instead of calling this per query.
    """
    if exact:
        return exact_attribution(
            objective,
            model,
            train_images,
            train_keys,
            query_images,
            query_keys,
            config,
            train_cond,
            query_cond,
        )
    train = sketch_gradients(objective, model, train_images, train_keys, config, train_cond)
    query = sketch_gradients(objective, model, query_images, query_keys, config, query_cond)
    return attribution_scores(query, train)


def top_k(
    scores: torch.Tensor | np.ndarray, train_keys: Sequence[SampleKey], k: int
) -> list[list[tuple[SampleKey, float]]]:
    """Per query, the ``k`` highest-scoring training keys with their scores (ties: lower index)."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    k = min(k, s.shape[1])
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return [[(train_keys[j], float(s[i, j])) for j in row.tolist()] for i, row in enumerate(order)]
