"""Layer-wise influence tracing: the per-sample curvature trace of the diffusion loss.

The seed paper (``seeds/000``, §3) scores sample i by s_i = tr(H_i), H_i the Hessian of its
training loss w.r.t. the parameters θ, decomposed as s_i ≈ Σ_ℓ tr(J_ℓᵀ H_i^(ℓ) J_ℓ) and estimated
with Rademacher (Hutchinson) probes. For the MSE diffusion loss of one (t, ε) draw,

    L(θ) = (1/D) ‖f(θ) − y‖²   (mean over the D output elements, as ``F.mse_loss``),

the output-space Hessian is ∂²L/∂f² = (2/D)·I, so the Gauss–Newton part of H_i is

    GGN_i = (2/D) Jᵀ J,   J = ∂f/∂θ,   tr(GGN_i restricted to layer ℓ) = (2/D) ‖J_ℓ‖_F²,

where J_ℓ are the columns of J for the parameters of layer ℓ. That is the paper's
tr(J_ℓᵀ H^(ℓ) J_ℓ) with the activation Hessian taken at the network output, where it is known in
closed form. We estimate it with Hutchinson probes in OUTPUT space: for Rademacher v ∈ {±1}^D,
E_v ‖J_ℓᵀ v‖² = ‖J_ℓ‖_F². One probe is one vector–Jacobian product (a backward pass of v·f) and
yields every layer at once, so per-layer parts sum to the total by construction. The sample's
score is the mean over its (t, ε) draws (the Hessian of the expected loss is the expectation of
per-draw Hessians) and over probes.

Where we depart from the seed, deliberately:

* Algorithm 1 scores a layer by the nuclear norm ‖Vᵀ H C V‖_* of a block-Lanczos projection.
  That is not the trace the paper defines in (1)–(2), and not an unbiased estimator of it (a
  nuclear norm of a k×k projection is ≥ |its trace| and depends on the basis); Appendix C proves
  unbiasedness only for (1/k)·tr(Vᵀ H C V) with Rademacher V. We implement that unbiased
  Hutchinson estimator, with the probes in output space (D-dimensional, exact activation Hessian)
  instead of a rank-k Lanczos basis.
* Equation (2) is loose about what "layer-wise" means: with J_ℓ = ∂z_ℓ/∂θ taken w.r.t. ALL
  parameters, Σ_ℓ J_ℓᵀ H^(ℓ) J_ℓ counts the curvature once per layer (z_ℓ depends on every
  earlier layer's parameters), and it also drops the second-order (residual) term, so it is not
  H_i. We take the Gauss–Newton matrix at the network output, where the activation Hessian is
  exactly (2/D)·I, and split ITS trace by parameter blocks: that decomposition is exact, and
  the layer parts sum to the total.
* The seed never says which timesteps; see :mod:`diffcurate.influence.objective`.
* Note the GGN trace depends on the sample only through x_t (and the conditioning): the target
  and residual enter only the full Hessian's second term.

Also provided, for verification and as the ``global-hessian``-style signal:

* ``mode="hessian"``: tr(∇²_θ L_i) per layer with PARAMETER-space Rademacher probes u and
  Hessian-vector products (reverse-over-reverse). One HVP serves all layers: u_ℓ·(Hu)_ℓ is
  unbiased for tr(H_ℓℓ) (cross-layer terms have zero mean) and the parts sum to uᵀHu. The full
  Hessian is indefinite, so its trace can be negative.
* ``exact=True``: GGN from the dense Jacobian (the D vector–Jacobian products with the output
  basis vectors, exactly what ``torch.func.jacrev`` does), or the Hessian diagonal from d HVPs
  with the parameter basis vectors. Only for tiny models.

Grouping: a "layer" is the module that owns a parameter (``down_blocks.0.resnets.0.conv1``).

Vectorisation: ``torch.func.functional_call`` + ``vjp`` per (sample, draw) item, ``vmap`` over
probes inside and over items outside. Diffusers ``UNet2DModel``/``UNet2DConditionModel``
(conv, group norm, self- and cross-attention) vmap cleanly once attention runs on the "math"
SDPA backend (see :func:`~diffcurate.influence.objective.scoring_mode`). A module that cannot be
vmapped (data-dependent Python control flow, ``.item()``) is detected on the first chunk and
scored by a per-item, per-probe loop instead (``ScoreResult.method`` ends in ``/loop``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.func import grad, vjp

from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    DrawBatch,
    Mapper,
    NetworkFn,
    SampleKey,
    ScoreResult,
    item_probes,
    keyed_generator,
    map_items,
    on_device,
    rademacher,
    resolve_device,
    scoring_mode,
    summarise,
    trainable_params,
)

Params = dict[str, torch.Tensor]


class TraceConfig(BaseModel):
    """Configuration of the per-sample curvature trace.

    Attributes:
        mode: ``"ggn"`` (the scorer) or ``"hessian"`` (full Hessian, incl. the residual term).
        exact: Dense computation instead of Hutchinson probes (tiny models only).
        probes: Hutchinson probes per (sample, draw). In ``"hessian"`` mode every probe is a
            parameter-sized Rademacher vector generated on the CPU (for reproducibility), so
            that mode is meant for verification and small models; the GGN probes are
            output-sized.
        seed: Seed of the probes (the (t, ε) seed lives in the objective).
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        vectorize: Use ``torch.func.vmap`` over items and probes (falls back to loops if a
            module has no batching rule).
        item_chunk: (sample, draw) items per vectorised call.
        probe_chunk: Probes (or exact basis vectors) per vectorised call.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["ggn", "hessian"] = "ggn"
    exact: bool = False
    probes: int = Field(8, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    vectorize: bool = True
    item_chunk: int = Field(8, ge=1)
    probe_chunk: int = Field(64, ge=1)


def layer_groups(param_names: Sequence[str]) -> tuple[tuple[str, ...], list[list[str]]]:
    """Group parameter names by owning module, in first-appearance order.

    Returns:
        The layer names and, per layer, its parameter names.
    """
    layers: dict[str, list[str]] = {}
    for name in param_names:
        owner = name.rsplit(".", 1)[0] if "." in name else "<root>"
        layers.setdefault(owner, []).append(name)
    return tuple(layers), list(layers.values())


def _layer_sums(values: Params, groups: list[list[str]]) -> torch.Tensor:
    """Sum ``values`` over each layer's parameters → ``[L]`` (one probe; vmap adds batch dims).

    Reducing per probe, before stacking probes, keeps memory at one gradient per probe in
    flight instead of P full gradients.
    """
    return torch.stack([sum(values[name].sum() for name in names) for names in groups])  # type: ignore[misc]


def _map_probes(
    mapper: Mapper,
    fn: Callable[..., torch.Tensor],
    probes: torch.Tensor | Params,
    chunk: int,
) -> torch.Tensor:
    """Map ``fn`` (one probe → ``[L]``) over the leading dim of ``probes`` in chunks: ``[P, L]``."""
    if isinstance(probes, torch.Tensor):
        n = probes.shape[0]
        parts = [mapper(fn)(probes[s : s + chunk]) for s in range(0, n, chunk)]
    else:
        n = next(iter(probes.values())).shape[0]
        parts = [
            mapper(fn)({k: v[s : s + chunk] for k, v in probes.items()}) for s in range(0, n, chunk)
        ]
    return torch.cat(parts)  # type: ignore[arg-type]


def _ggn_item(
    f: NetworkFn, params: Params, groups: list[list[str]], chunk: int
) -> Callable[[Mapper], Callable[..., torch.Tensor]]:
    """Per-item GGN estimates ``[P, L]``: (2/D)·‖J_ℓᵀ v‖² for each output-space probe v.

    With the D output basis vectors as probes, the sum over probes is the exact (2/D)‖J_ℓ‖_F²
    (the dense Jacobian, row by row, as ``torch.func.jacrev`` builds it).
    """

    def build(mapper: Mapper) -> Callable[..., torch.Tensor]:
        def item(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, v: torch.Tensor):
            out, vjp_fn = vjp(lambda p: f(p, x_t, t, cond), params)
            scale = 2.0 / out.numel()

            def per_probe(vi: torch.Tensor) -> torch.Tensor:
                grads = vjp_fn(vi)[0]
                return scale * _layer_sums({k: g.square() for k, g in grads.items()}, groups)

            return _map_probes(mapper, per_probe, v, chunk)

        return item

    return build


def _hessian_item(
    f: NetworkFn, params: Params, groups: list[list[str]], chunk: int, exact: bool
) -> Callable[[Mapper], Callable[..., torch.Tensor]]:
    """Per-item Hessian estimates: u_ℓ·(H u)_ℓ for parameter-space probes u.

    Hutchinson: ``[P, L]`` for the given Rademacher probes. Exact: ``[1, L]``, the sum over all
    d parameter basis vectors e_k of e_kᵀ H e_k = H_kk (basis generated in chunks, so memory is
    chunk × d, never d × d).
    """

    def build(mapper: Mapper) -> Callable[..., torch.Tensor]:
        def item(
            x_t: torch.Tensor,
            t: torch.Tensor,
            cond: torch.Tensor | None,
            y: torch.Tensor,
            u: Params | None = None,
        ):
            def loss(p: Params) -> torch.Tensor:
                return (f(p, x_t, t, cond) - y.reshape(-1)).square().mean()

            _, hvp_fn = vjp(grad(loss), params)

            def per_probe(ui: Params) -> torch.Tensor:
                hu = hvp_fn(ui)[0]
                return _layer_sums({k: ui[k] * hu[k] for k in ui}, groups)

            if not exact:
                assert u is not None
                return _map_probes(mapper, per_probe, u, chunk)
            parts = [
                _map_probes(mapper, per_probe, basis, chunk)
                for basis in _basis_chunks(params, chunk)
            ]
            return torch.cat(parts).sum(dim=0, keepdim=True)

        return item

    return build


def _basis_chunks(params: Params, chunk: int) -> Iterator[Params]:
    """The d parameter-space basis vectors, ``chunk`` at a time, as ``{name: [c, *shape]}``."""
    first = next(iter(params.values()))
    sizes = [p.numel() for p in params.values()]
    total = sum(sizes)
    for start in range(0, total, chunk):
        c = min(chunk, total - start)
        rows = torch.zeros((c, total), dtype=first.dtype, device=first.device)
        rows[torch.arange(c), start + torch.arange(c)] = 1.0
        blocks = rows.split(sizes, dim=1)
        yield {
            name: b.reshape(c, *p.shape)
            for (name, p), b in zip(params.items(), blocks, strict=True)
        }


def _param_probes(
    seed: int, keys: Sequence[SampleKey], draw_idx: Sequence[int], n: int, params: Params
) -> Params:
    """Parameter-space Rademacher probes ``{name: [items, n, *shape]}``, keyed per item."""
    sizes = [p.numel() for p in params.values()]
    flat = torch.stack(
        [
            rademacher((n, sum(sizes)), keyed_generator(seed, k, "hessian-probe", j))
            for k, j in zip(keys, draw_idx, strict=True)
        ]
    )
    out = {}
    for (name, p), block in zip(params.items(), flat.split(sizes, dim=2), strict=True):
        out[name] = block.reshape(len(keys), n, *p.shape).to(p)
    return out


def _plan(
    config: TraceConfig, f: NetworkFn, params: Params, groups: list[list[str]], batch: DrawBatch
) -> tuple[Callable[[Mapper], Callable[..., torch.Tensor]], Callable[[slice], tuple[object, ...]]]:
    """The per-item function and its per-slice arguments for the configured mode."""
    keys, draw_idx, dim = batch.item_keys, batch.item_draws, batch.dim

    def base(sl: slice) -> tuple[object, ...]:
        return (batch.x_t[sl], batch.t[sl], batch.cond_at(sl))

    def output_basis(sl: slice) -> tuple[object, ...]:
        eye = torch.eye(dim, dtype=batch.x_t.dtype, device=batch.x_t.device)
        return (*base(sl), eye.expand(len(keys[sl]), dim, dim))

    def output_probes(sl: slice) -> tuple[object, ...]:
        v = item_probes(config.seed, "ggn-probe", keys[sl], draw_idx[sl], config.probes, dim)
        return (*base(sl), v.to(batch.x_t))

    def with_target(sl: slice) -> tuple[object, ...]:
        return (*base(sl), batch.target[sl])

    def param_probes(sl: slice) -> tuple[object, ...]:
        u = _param_probes(config.seed, keys[sl], draw_idx[sl], config.probes, params)
        return (*base(sl), batch.target[sl], u)

    chunk = config.probe_chunk
    if config.mode == "ggn":
        return _ggn_item(f, params, groups, chunk), output_basis if config.exact else output_probes
    build = _hessian_item(f, params, groups, chunk, exact=config.exact)
    return build, with_target if config.exact else param_probes


def trace_scores(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: TraceConfig | None = None,
    cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Per-sample curvature trace (GGN or Hessian), with per-layer and per-timestep parts.

    Args:
        objective: Loss, noise schedule, timestep schedule and draw seed.
        model: The denoiser (not modified: it is copied if dtype/device differ).
        images: ``[n, C, H, W]`` images (pixel space; encoded by the objective's VAE if any).
        sample_keys: One stable id per image; the draws and probes depend only on these, so
            scores do not depend on batch or shard composition.
        config: Mode, probes, dtype, device (defaults: GGN, 8 probes, float32, CPU).
        cond: Optional ``encoder_hidden_states`` ``[n, seq, dim]`` for conditional UNets.

    Returns:
        A :class:`ScoreResult` whose ``score`` is the mean trace over draws and probes (high =
        sharp = risky), with ``per_layer`` summing to it.
    """
    config = config or TraceConfig()
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = on_device(model, dtype, device)
    with scoring_mode(net):
        batch = objective.prepare(images, sample_keys, dtype, device, cond)
        params = trainable_params(net)
        names, groups = layer_groups(list(params))
        build, args = _plan(config, objective.network(net), params, groups, batch)
        parts, used_vmap = map_items(build, len(batch), args, config.item_chunk, config.vectorize)
    if config.mode == "ggn" and config.exact:
        parts = parts.sum(dim=1, keepdim=True)  # sum over the D basis "probes" = ‖J_ℓ‖_F²
    n, k = batch.n_samples, batch.n_draws
    per_layer = parts.reshape(n, k, parts.shape[1], len(names))
    method = "/".join(
        (config.mode, "exact" if config.exact else "hutchinson", "vmap" if used_vmap else "loop")
    )
    return summarise(
        per_layer.sum(dim=-1), objective.schedule, batch.sample_keys, method, per_layer, names
    )
