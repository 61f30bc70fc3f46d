"""The ``global-hessian`` baseline: batch-level Hessian-trace thresholding (seed 000 §4, Jeon).

What seed 000 says
------------------
Jeon et al. (2024) use the trace of the Hessian of the training objective, tr(H_θ), as a global
sharpness proxy for memorization. Seed 000 turns it into a pruning baseline (§4, "Global Hessian
thresholding"): "after computing the overall trace, we progressively downweight batches whose
minibatch Hessian trace contributes most to the total until the deletion budget is met". Its cost
row (73 GPU-h vs 2.3 for the layer-wise method) is that of full parameter-space Hessian-vector
products ("must back-prop through every parameter").

What we compute
---------------
The set being scored is cut into minibatches B_1..B_M of ``batch_size`` samples (64, the batch
size seed 000 quotes for its own Algorithm 1), in a seeded order keyed by sample id (sorted by
``keyed_seed(seed, id, "global-hessian-batch", 0)``), so batch membership depends only on (seed,
the set's ids). For each minibatch, with L_b(θ) = (1/|B_b|) Σ_{i∈B_b} ℓ_i(θ) the batch's mean
diffusion loss (ℓ_i on the sample's keyed (t, ε) draws, mean over draws and elements),

    tr(∇²_θ L_b) = E_u[ uᵀ ∇²_θ L_b u ],   u ~ Rademacher in PARAMETER space (all d weights),

estimated with ``probes`` Hessian-vector products (double backward through every parameter), or
exactly with the d basis vectors (``exact=True``, tiny models). The batch's contribution to the
total is

    c_b = |B_b| · tr(∇²L_b) = Σ_{i∈B_b} tr(∇²ℓ_i),   tr(∇²L_total) = (1/n) Σ_b c_b,

(the Hessian is additive over samples). Every sample of a batch gets c_b as its risk score, with
the batch's Hutchinson standard error and per-layer parts (u_ℓ·(Hu)_ℓ for the parameters of layer
ℓ, which sum to the total).

"Progressively downweight ... until the budget is met": at fixed weights, removing a batch lowers
the total by exactly c_b and changes no other batch's contribution, so the progressive procedure
is a greedy pass over batches by decreasing c_b. :func:`greedy_batch_removal` implements it with
"downweight" taken as removal (weight 0): whole batches in order, the last one cut to the budget
(its members by key string). Equivalently, top-ρ% flagging of the per-sample scores with id
tie-breaks (``curation.flag``) selects the same whole batches first.

Sharding: batches are formed within the set passed in (a shard), so the scores depend on the
shard's composition through batch membership, exactly as a training run's minibatches do; they do
not depend on the order of samples in it.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    DrawBatch,
    SampleKey,
    ScoreResult,
    keyed_generator,
    keyed_seed,
    on_device,
    rademacher,
    resolve_device,
    scoring_mode,
)
from diffcurate.influence.trace import layer_groups


class GlobalHessianConfig(BaseModel):
    """Configuration of batch-level Hessian-trace thresholding.

    Attributes:
        batch_size: Samples per minibatch (64, as seed 000 quotes).
        probes: Parameter-space Rademacher probes (HVPs) per minibatch.
        exact: Dense trace from the d basis vectors instead of probes (tiny models only).
        seed: Seed of the batch assignment and of the probes.
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        batch_items: (sample, draw) items per forward/double-backward pass (memory bound only;
            the Hessian is additive over items, so results do not depend on it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(64, ge=1)
    probes: int = Field(16, ge=1)
    exact: bool = False
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_items: int = Field(64, ge=1)


@dataclass(frozen=True)
class BatchTraces:
    """Hessian-trace contributions of the minibatches of one set.

    Attributes:
        batches: Member keys of each minibatch, in batch order.
        contribution: ``[M]`` c_b = |B_b|·tr(∇²L_b) = Σ_{i∈B_b} tr(∇²ℓ_i).
        stderr: ``[M]`` standard error of c_b over probes (NaN for exact or one probe).
        per_layer: ``[M, L]`` layer parts of c_b (sum to ``contribution``).
        layer_names: The L layers (owning module paths).
    """

    batches: tuple[tuple[SampleKey, ...], ...]
    contribution: np.ndarray
    stderr: np.ndarray
    per_layer: np.ndarray
    layer_names: tuple[str, ...]

    @property
    def n_samples(self) -> int:
        return sum(len(b) for b in self.batches)

    @property
    def total_trace(self) -> float:
        """tr(∇²L) of the mean loss over the whole set: Σ_b c_b / n."""
        return float(self.contribution.sum() / self.n_samples)


def batch_order(sample_keys: Sequence[SampleKey], seed: int) -> list[int]:
    """Indices of ``sample_keys`` in the seeded batch order (keyed hash, then key string)."""
    return sorted(
        range(len(sample_keys)),
        key=lambda i: (
            keyed_seed(seed, sample_keys[i], "global-hessian-batch", 0),
            str(sample_keys[i]),
        ),
    )


def _select(batch: DrawBatch, rows: Sequence[int]) -> DrawBatch:
    k = batch.n_draws
    items = torch.tensor([r * k + j for r in rows for j in range(k)], device=batch.x_t.device)
    return DrawBatch(
        x_t=batch.x_t[items],
        t=batch.t[items],
        target=batch.target[items],
        cond=None if batch.cond is None else batch.cond[items],
        n_samples=len(rows),
        n_draws=k,
    )


def _basis(d: int, chunk: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for start in range(0, d, chunk):
        c = min(chunk, d - start)
        rows = torch.zeros((c, d), dtype=dtype)
        rows[torch.arange(c), start + torch.arange(c)] = 1.0
        yield from rows


def _batch_trace(
    objective: DiffusionObjective,
    net: torch.nn.Module,
    params: list[torch.Tensor],
    layer_of: torch.Tensor,
    n_layers: int,
    batch: DrawBatch,
    probes: list[torch.Tensor] | None,
    config: GlobalHessianConfig,
) -> torch.Tensor:
    """Per-probe, per-layer estimates ``[P, L]`` of uᵀ ∇²(mean batch loss) u (exact: ``[1, L]``).

    The mean loss is split into item chunks; uᵀHu is additive over them, so every chunk's
    double backward reuses the same probes.
    """
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    n_est = 1 if probes is None else len(probes)
    out = torch.zeros((n_est, n_layers), dtype=torch.float64)
    n_items = len(batch)
    for s in range(0, n_items, config.batch_items):
        sl = slice(s, s + config.batch_items)
        with torch.enable_grad():
            pred = objective.model_output(net, batch.x_t[sl], batch.t[sl], batch.cond_at(sl))
            loss = (pred - batch.target[sl]).square().flatten(1).mean(dim=1).sum() / n_items
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat_grad = torch.cat([g.reshape(-1) for g in grads])
            vectors = probes if probes is not None else _basis(d, 256, torch.float64)
            for p_idx, u in enumerate(vectors):
                u_w = u.to(flat_grad)
                hv = torch.autograd.grad(flat_grad, params, grad_outputs=u_w, retain_graph=True)
                prod = (u_w * torch.cat([h.reshape(-1) for h in hv])).detach().double().cpu()
                row = 0 if probes is None else p_idx
                out[row].index_add_(0, layer_of, prod)
    return out


def batch_hessian_traces(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: GlobalHessianConfig | None = None,
    cond: torch.Tensor | None = None,
) -> BatchTraces:
    """Hessian-trace contribution c_b of every minibatch of the set (module docstring).

    Args:
        objective: Loss, noise, timestep schedule and (t, ε) seed.
        model: The denoiser (not modified; copied only if dtype/device differ).
        images: ``[n, C, H, W]`` images.
        sample_keys: One stable id per image (batch membership and probes are keyed by ids).
        config: Batch size, probes or exact, seed, dtype, device.
        cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]``.
    """
    config = config or GlobalHessianConfig()
    keys = list(sample_keys)
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} images but {len(keys)} sample keys")
    if len(set(map(str, keys))) != len(keys):
        raise ValueError("duplicate sample keys")
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    names, groups = layer_groups([n for n, _ in named])
    layer_index = {n: li for li, members in enumerate(groups) for n in members}
    params = [p for _, p in named]
    layer_of = torch.cat(
        [torch.full((p.numel(),), layer_index[n], dtype=torch.long) for n, p in named]
    )
    d = int(layer_of.numel())
    order = batch_order(keys, config.seed)
    member_rows = [
        order[s : s + config.batch_size] for s in range(0, len(order), config.batch_size)
    ]
    contribution, stderr, per_layer = [], [], []
    with scoring_mode(net):
        batch = objective.prepare(images, keys, dtype, device, cond)
        for rows in member_rows:
            members = tuple(keys[r] for r in rows)
            probes = None
            if not config.exact:
                tag = "\x1f".join(sorted(map(str, members)))
                probes = [
                    rademacher((d,), keyed_generator(config.seed, tag, "global-hessian-probe", p))
                    for p in range(config.probes)
                ]
            est = _batch_trace(
                objective, net, params, layer_of, len(names), _select(batch, rows), probes, config
            )
            est = est * len(rows)  # c_b = |B_b| · tr(∇²L_b)
            totals = est.sum(dim=1)
            if not torch.isfinite(totals).all():
                raise FloatingPointError(f"non-finite Hessian trace for batch {list(members)[:5]}")
            contribution.append(float(totals.mean()))
            per_layer.append(est.mean(dim=0).numpy())
            stderr.append(
                float(totals.std(unbiased=True)) / math.sqrt(len(totals))
                if len(totals) > 1
                else math.nan
            )
    return BatchTraces(
        batches=tuple(tuple(keys[r] for r in rows) for rows in member_rows),
        contribution=np.array(contribution),
        stderr=np.array(stderr),
        per_layer=np.stack(per_layer) if per_layer else np.zeros((0, len(names))),
        layer_names=names,
    )


def global_hessian_risk(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: GlobalHessianConfig | None = None,
    cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Per-sample risk = its minibatch's contribution c_b (HIGH = risky), with stderr and layers."""
    config = config or GlobalHessianConfig()
    traces = batch_hessian_traces(objective, model, images, sample_keys, config, cond)
    row_of = {str(k): b for b, members in enumerate(traces.batches) for k in members}
    idx = np.array([row_of[str(k)] for k in sample_keys], dtype=np.int64)
    mode = "exact" if config.exact else f"hutchinson{config.probes}"
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=traces.contribution[idx],
        stderr=traces.stderr[idx],
        per_layer=traces.per_layer[idx],
        layer_names=traces.layer_names,
        per_timestep=None,
        timesteps=objective.schedule.timesteps,
        method=f"global-hessian/batch{config.batch_size}/{mode}",
    )


def greedy_batch_removal(traces: Sequence[BatchTraces], budget: int) -> list[SampleKey]:
    """Remove whole minibatches by decreasing contribution until ``budget`` samples are removed.

    Batches of all given shards compete; ties in contribution go to the batch whose smallest key
    string is smaller. The last batch is cut to the budget, its members taken in key-string order.
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    pool = [(float(c), b) for t in traces for c, b in zip(t.contribution, t.batches, strict=True)]
    pool.sort(key=lambda cb: (-cb[0], min(map(str, cb[1]))))
    removed: list[SampleKey] = []
    for _, members in pool:
        if len(removed) >= budget:
            break
        removed.extend(sorted(members, key=str)[: budget - len(removed)])
    return removed
