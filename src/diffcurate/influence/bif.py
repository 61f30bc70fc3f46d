"""Local Bayesian influence functions (BIF, seed 004) for diffusion models.

What is computed
----------------
The local BIF replaces the inverse Hessian of classical influence functions by a covariance over
a posterior *localised* at the trained weights w* (seed 004, eq. 5-6):

    p_γ(w | D, w*) ∝ exp( −nβ · L̄(w) − (γ/2) ‖w − w*‖² ),   L̄(w) = (1/n) Σ_i ℓ_i(w),

    BIF(z_i, φ) = −Cov_γ( ℓ_i(w), φ(w) ).

With φ = ℓ_j, the loss of a query z_j, this is the pairwise influence BIF(z_i, z_j). The paper
writes the likelihood term as −Σ_i ℓ_i(w) in eq. 5 and, from §3.1/App. B.1 on, tempers it with a
scalar inverse temperature β, tuning only the product nβ ("the effective number of samples"); the
posterior above is the stationary law of its sampler (below).

Sign and normalisation. BIF < 0 means up-weighting z_i lowers the query's expected loss (z_i is a
proponent). ``normalised`` is the paper's normalised BIF, −Corr(ℓ_i, φ) ∈ [−1, 1] (§3.2: "computing
the Pearson correlation instead of a raw covariance"); the posterior correlation itself is
``−normalised``. :attr:`BIFAttribution.scores` is Cov = −BIF, HIGH = the training image helps the
query, the sign convention of ``ekfac_attribution`` and ``dmin.attribute``.

Risk. The self-BIF of a sample is −Var_γ(ℓ_i): a sample whose loss moves a lot over the local
posterior sits in a sharp, sample-specific direction of the loss landscape (to first order
Var ≈ g_iᵀ (nβ H̄ + γI)⁻¹ g_i, H̄ the Hessian of L̄ at w*, g_i = ∇ℓ_i: a damped self-influence,
seed 004 App. A). The risk score is the posterior loss variance Var_γ(ℓ_i) (HIGH = risky);
``stderr`` is the standard error of the pooled variance across chains, std_c(Var_c) / sqrt(C)
with Var_c the variance within chain c (NaN for one chain).

Sampler (seed 004 §3.1 and Algorithm 1, followed exactly)
---------------------------------------------------------
For each chain c = 1..C, starting at w_0 = w*:

    w_{s+1} = w_s − (ε/2) · ( (nβ/m) Σ_{k∈B_s} ∇_w ℓ_k(w_s) + γ (w_s − w*) ) + N(0, ε I)

where B_s is a uniformly random minibatch of m distinct samples of the SGLD set, ε the step size
and N(0, ε I) Gaussian noise of VARIANCE ε (std sqrt(ε)). As in Algorithm 1 the losses are recorded
at w_s BEFORE the update at step s; the first ``burn_in`` states are discarded (App. B.1, "we
discard the first b draws") and then every ``thinning``-th state is recorded until ``draws`` (T)
draws per chain are kept: recorded states are w_s for s = b + k·thinning, k = 0..T−1 (b = 0 and
thinning = 1 is Algorithm 1 verbatim, whose first draw is w* itself). N_draws = C·T. Covariances
are the standard sample covariance over all C·T draws pooled (Algorithm 1's
B = L (I − 11ᵀ/N)² Φᵀ / (N − 1)).

The stationary law of this update (ε → 0, exact gradients) is p_γ above. At finite ε it is biased
by O(ε): for a Gaussian posterior with precision Λ and full-batch gradients the chain is an AR(1)
process whose stationary covariance is (Λ (I − εΛ/4))⁻¹; ``tests/influence/test_bif.py`` checks the
sampler against exactly that on a linear-Gaussian model.

Sampled weights: every parameter with ``requires_grad=True``. Freeze the rest to restrict the
posterior to a subset of weights (App. B.1, "weight-restricted" sampling). The sampler runs on a
private deep copy of the model (in the working dtype/device), so the caller's model is never
modified; it runs in eval mode (no dropout) with the "math" attention backend.

Diffusion losses and draws
--------------------------
ℓ_i(w) is the objective's per-sample loss, (1/K) Σ_j mean_D (f_w(x_t^{(j)}) − y^{(j)})², on the
sample's keyed (t, ε) draws (:meth:`DiffusionObjective.prepare`): for the loss traces of training
and query samples it is therefore a deterministic function of w, and a sample's trace does not
depend on which other samples are scored with it.

The SGLD gradient needs the training loss L̄. ``gradient_draws="fresh"`` (default) draws new
(t, ε) for each minibatch sample at each step (keyed by config seed, chain, step and sample key,
so still reproducible): an unbiased stochastic gradient of the diffusion objective itself,
E_{t,ε}, whose minimum the trained w* approximates. ``"keyed"`` uses each sample's fixed keyed
draws, so the sampled posterior is that of the finite Monte-Carlo loss (what the loss traces
measure); its minimum is not w*, and the linear-Gaussian test uses it because its posterior is
then available in closed form.

The SGLD set (whose minibatches drive the chain) is the training set scored unless ``sgld_*`` is
given: the paper draws minibatches from the full training set while attributing a subset (§4.2).
To score a corpus shard by shard, pass the SAME SGLD set (e.g. a fixed sample of the corpus) for
every shard: the chains are then identical for every shard (same seed, same set), each sample's
trace depends only on its own draws, and the concatenated shard results equal a one-shot run. The
price is that the chains are re-run per shard; Algorithm 1's alternative, evaluating every set at
each draw, is :func:`loss_traces` with all sets at once (memory O(N_draws · (n + q)) for traces).

Defaults
--------
The paper's Table 3 row "Retraining ResNet / CIFAR10" (the small-image-model setting its LDS
evaluation validates): ε = 1e-5, nβ = 200, γ = 1e4, C = 4 chains, T = 100 draws per chain,
b = 0 burn-in, minibatch m = 1024 (capped at the SGLD set size). The paper reports the BIF "stable
across a wide range of hyperparameter ablations" (App. C.3, a sweep over b ∈ {0, 100},
nβ ∈ [100, 3000], γ ∈ [1e3, 1e5]) "as long as the loss trace converges", and interpretable
results with 100-1000 total draws (App. C.2). ``sgld_loss`` (the minibatch loss at every step)
is returned to check that the trace converges; a diverging chain (non-finite weights or losses)
raises ``FloatingPointError`` with a hint to lower ε. Vanilla SGLD only: the RMSprop-
preconditioned variant the authors also used (App. B.1) is not implemented.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
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
    resolve_device,
    scoring_mode,
)

Observer = Callable[[int, int, torch.nn.Module], None]
"""``observe(chain, draw, net)``: called at every recorded draw with the private sampled copy."""


class BIFConfig(BaseModel):
    """Configuration of the localised SGLD sampler and the BIF estimate.

    Attributes:
        step_size: ε, the SGLD step size; the injected noise is N(0, ε I). Default 1e-5.
        localization: γ, precision of the Gaussian prior centred at w*. Default 1e4.
        nbeta: nβ, the effective sample size scaling the mean minibatch gradient (the paper's
            single tuned product of n and the inverse temperature β). Default 200.
        chains: C, independent chains (all start at w*). Default 4.
        draws: T, recorded draws per chain. Default 100.
        burn_in: b, initial states discarded per chain. Default 0.
        thinning: Record every ``thinning``-th state after burn-in. Default 1 (every state).
        batch_size: m, SGLD minibatch size (capped at the SGLD set size). Default 1024.
        gradient_draws: ``"fresh"`` (new keyed (t, ε) per step: stochastic gradient of the
            diffusion objective) or ``"keyed"`` (each sample's fixed draws). See module docstring.
        seed: Seed of the minibatches, the Langevin noise and fresh gradient draws (the loss
            traces' (t, ε) seed is the objective's).
        dtype: Working dtype; float64 for tests.
        device: ``"cpu"`` or ``"cuda"``.
        batch_items: (sample, draw) items per forward pass (memory bound only).

    Defaults are the paper's Table 3 CIFAR-10 retraining row (see the module docstring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_size: float = Field(1e-5, gt=0)
    localization: float = Field(1e4, ge=0)
    nbeta: float = Field(200.0, ge=0)
    chains: int = Field(4, ge=1)
    draws: int = Field(100, ge=1)
    burn_in: int = Field(0, ge=0)
    thinning: int = Field(1, ge=1)
    batch_size: int = Field(1024, ge=1)
    gradient_draws: Literal["fresh", "keyed"] = "fresh"
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_items: int = Field(64, ge=1)

    @property
    def n_steps(self) -> int:
        """SGLD updates per chain: b + (T − 1)·thinning (no update after the last draw)."""
        return self.burn_in + (self.draws - 1) * self.thinning

    def is_recorded(self, step: int) -> int | None:
        """The draw index recorded at state ``step`` (w_step), or None."""
        offset = step - self.burn_in
        if offset < 0 or offset % self.thinning:
            return None
        k = offset // self.thinning
        return k if k < self.draws else None


# ------------------------------------------------------------------------------- data sets
@dataclass(frozen=True)
class _Set:
    """One set of samples prepared on the working device: encoded x0 and keyed draws."""

    keys: tuple[SampleKey, ...]
    x0: torch.Tensor
    cond: torch.Tensor | None
    batch: DrawBatch


def _prepare(
    objective: DiffusionObjective,
    images: torch.Tensor,
    keys: Sequence[SampleKey],
    cond: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
) -> _Set:
    keys = tuple(keys)
    if images.shape[0] != len(keys):
        raise ValueError(f"{what}: {images.shape[0]} images but {len(keys)} sample keys")
    if len(set(map(str, keys))) != len(keys):
        raise ValueError(f"{what}: duplicate sample keys")
    x0 = objective.encode(images.to(device=device, dtype=dtype))
    c = None if cond is None else cond.to(device=device, dtype=dtype)
    draws = objective.draws(keys, x0.shape[1:], dtype=dtype, device=device)
    return _Set(keys=keys, x0=x0, cond=c, batch=objective.expand(x0, draws, c))


def _select(batch: DrawBatch, rows: torch.Tensor) -> DrawBatch:
    """The items of samples ``rows`` (sample-major) of an expanded batch."""
    k = batch.n_draws
    items = (rows[:, None] * k + torch.arange(k)[None, :]).reshape(-1).to(batch.x_t.device)
    return DrawBatch(
        x_t=batch.x_t[items],
        t=batch.t[items],
        target=batch.target[items],
        cond=None if batch.cond is None else batch.cond[items],
        n_samples=int(rows.numel()),
        n_draws=k,
    )


def _fresh_batch(
    objective: DiffusionObjective, sgld: _Set, rows: torch.Tensor, config: BIFConfig, tag: str
) -> DrawBatch:
    """New (t, ε) draws for the minibatch ``rows``, keyed by (sample key, seed, chain, step)."""
    keys = [f"{sgld.keys[r]}\x1fbif-sgld\x1f{config.seed}\x1f{tag}" for r in rows.tolist()]
    x0 = sgld.x0[rows.to(sgld.x0.device)]
    draws = objective.draws(keys, x0.shape[1:], dtype=x0.dtype, device=x0.device)
    cond = None if sgld.cond is None else sgld.cond[rows.to(sgld.cond.device)]
    return objective.expand(x0, draws, cond)


def _per_sample_loss(
    objective: DiffusionObjective, net: torch.nn.Module, batch: DrawBatch, batch_items: int
) -> torch.Tensor:
    """ℓ_i = mean over draws of the objective's per-draw loss: ``[n]`` (no grad)."""
    return objective.batch_loss(net, batch, batch_items=batch_items).mean(dim=1)


def _accumulate_gradient(
    objective: DiffusionObjective, net: torch.nn.Module, batch: DrawBatch, batch_items: int
) -> float:
    """Backpropagate Σ_k ℓ_k over the minibatch into ``.grad``; returns the mean ℓ_k."""
    total = 0.0
    k = batch.n_draws
    for s in range(0, len(batch), batch_items):
        sl = slice(s, s + batch_items)
        out = objective.model_output(net, batch.x_t[sl], batch.t[sl], batch.cond_at(sl))
        per_item = (out - batch.target[sl]).square().flatten(1).mean(dim=1)
        loss = per_item.sum() / k
        loss.backward()
        total += float(loss.detach())
    return total / batch.n_samples


# ------------------------------------------------------------------------------- sampler
def sgld_chains(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    sgld_images: torch.Tensor,
    sgld_keys: Sequence[SampleKey],
    observe: Observer,
    config: BIFConfig | None = None,
    sgld_cond: torch.Tensor | None = None,
) -> np.ndarray:
    """Run C localised SGLD chains from w* and call ``observe`` at every recorded draw.

    Args:
        objective: Loss, noise, timestep schedule and the (t, ε) seed.
        model: The trained denoiser; its trainable parameters are w* (never modified: the chains
            run on a private copy).
        sgld_images: ``[n, C, H, W]`` images whose minibatch gradients drive the chains.
        sgld_keys: One stable key per SGLD image.
        observe: ``observe(chain, draw, net)`` at each recorded state; ``net`` is the private copy
            holding w_{c,t}. It must not modify ``net``.
        config: Sampler hyperparameters (module docstring gives the update rule).
        sgld_cond: Optional ``encoder_hidden_states`` of the SGLD images.

    Returns:
        ``[C, n_steps + 1]`` float64: the minibatch mean loss at every state w_s (NaN at the final
        state, where no gradient is taken), a convergence diagnostic ("loss trace").
    """
    config = config or BIFConfig()
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    net = copy.deepcopy(model).to(device=device, dtype=dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to sample")
    with torch.no_grad():
        w_star = [p.detach().clone() for p in params]
    sizes = [p.numel() for p in params]
    d = sum(sizes)
    eps, gamma = config.step_size, config.localization
    with scoring_mode(net):
        sgld = _prepare(objective, sgld_images, sgld_keys, sgld_cond, dtype, device, "SGLD set")
        n = len(sgld.keys)
        if n == 0:
            raise ValueError("the SGLD set is empty")
        m = min(config.batch_size, n)
        loss_trace = np.full((config.chains, config.n_steps + 1), np.nan)
        for c in range(config.chains):
            with torch.no_grad():
                for p, p0 in zip(params, w_star, strict=True):
                    p.copy_(p0)
            for step in range(config.n_steps + 1):
                k = config.is_recorded(step)
                if k is not None:
                    observe(c, k, net)
                if step == config.n_steps:
                    break
                tag = f"{c}\x1f{step}"
                gen = keyed_generator(config.seed, f"chain{c}", "bif-minibatch", step)
                rows = torch.randperm(n, generator=gen)[:m]
                if config.gradient_draws == "keyed":
                    batch = _select(sgld.batch, rows)
                else:
                    batch = _fresh_batch(objective, sgld, rows, config, tag)
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    loss_trace[c, step] = _accumulate_gradient(
                        objective, net, batch, config.batch_items
                    )
                noise = torch.randn(
                    d,
                    generator=keyed_generator(config.seed, f"chain{c}", "bif-noise", step),
                    dtype=torch.float64,
                )
                with torch.no_grad():
                    for p, p0, z in zip(params, w_star, noise.split(sizes), strict=True):
                        drift = (config.nbeta / m) * p.grad + gamma * (p - p0)
                        p.add_(-(eps / 2) * drift + math.sqrt(eps) * z.reshape(p.shape).to(p))
                        p.grad = None
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise FloatingPointError(
                        f"SGLD chain {c} diverged at step {step} (non-finite weights); "
                        f"lower step_size (now {eps:g}) or raise localization"
                    )
    return loss_trace


# ------------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class LossTraces:
    """Per-sample losses at every posterior draw.

    Attributes:
        train: ``[C, T, n]`` float64 losses ℓ_i(w_{c,t}) of the training samples.
        query: ``[C, T, q]`` float64 losses of the query samples (q may be 0).
        train_keys: The n training keys.
        query_keys: The q query keys.
        sgld_loss: ``[C, n_steps + 1]`` minibatch mean loss per SGLD state (diagnostic).
    """

    train: np.ndarray
    query: np.ndarray
    train_keys: tuple[SampleKey, ...]
    query_keys: tuple[SampleKey, ...]
    sgld_loss: np.ndarray

    @property
    def n_draws(self) -> int:
        """N_draws = C·T."""
        return int(self.train.shape[0] * self.train.shape[1])


def loss_traces(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor | None = None,
    query_keys: Sequence[SampleKey] = (),
    config: BIFConfig | None = None,
    *,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
    sgld_images: torch.Tensor | None = None,
    sgld_keys: Sequence[SampleKey] | None = None,
    sgld_cond: torch.Tensor | None = None,
) -> LossTraces:
    """Losses of the training and query samples at each of the C·T posterior draws.

    Each sample's loss uses its own keyed (t, ε) draws, so it is a deterministic function of the
    weights. The chains are driven by minibatches of the SGLD set (default: the training set).

    Args:
        objective: Loss, noise, timestep schedule, (t, ε) seed.
        model: The trained denoiser (w*); not modified.
        train_images: ``[n, C, H, W]`` training images.
        train_keys: One stable key per training image.
        query_images: ``[q, C, H, W]`` query images (e.g. generated images), or None.
        query_keys: One key per query (a training key gives that sample's draws).
        config: Sampler settings.
        train_cond: Optional ``encoder_hidden_states`` of the training images.
        query_cond: Optional ``encoder_hidden_states`` of the queries.
        sgld_images: The set whose minibatch gradients drive the chains (default the training
            set); pass the same set for every shard to make shard results combinable.
        sgld_keys: Keys of ``sgld_images`` (required with them).
        sgld_cond: Optional conditioning of ``sgld_images``.
    """
    config = config or BIFConfig()
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    if sgld_images is None:
        sgld_images, sgld_keys, sgld_cond = train_images, train_keys, train_cond
    elif sgld_keys is None:
        raise ValueError("sgld_images needs sgld_keys")
    assert sgld_keys is not None
    train = _prepare(objective, train_images, train_keys, train_cond, dtype, device, "training")
    if query_images is None:
        if len(query_keys):
            raise ValueError("query_keys given without query_images")
        query = None
    else:
        query = _prepare(objective, query_images, query_keys, query_cond, dtype, device, "query")
    n_q = 0 if query is None else len(query.keys)
    shape = (config.chains, config.draws)
    train_tr = np.full((*shape, len(train.keys)), np.nan)
    query_tr = np.full((*shape, n_q), np.nan)

    def observe(c: int, k: int, net: torch.nn.Module) -> None:
        losses = _per_sample_loss(objective, net, train.batch, config.batch_items)
        train_tr[c, k] = losses.to(device="cpu", dtype=torch.float64).numpy()
        if query is not None:
            q_losses = _per_sample_loss(objective, net, query.batch, config.batch_items)
            query_tr[c, k] = q_losses.to(device="cpu", dtype=torch.float64).numpy()
        if not (np.isfinite(train_tr[c, k]).all() and np.isfinite(query_tr[c, k]).all()):
            raise FloatingPointError(
                f"non-finite losses at SGLD draw {k} of chain {c}; lower step_size "
                f"(now {config.step_size:g}) or raise localization"
            )

    sgld_loss = sgld_chains(objective, model, sgld_images, sgld_keys, observe, config, sgld_cond)
    return LossTraces(
        train=train_tr,
        query=query_tr,
        train_keys=train.keys,
        query_keys=() if query is None else query.keys,
        sgld_loss=sgld_loss,
    )


# ------------------------------------------------------------------------------- BIF
def _flat(traces: np.ndarray) -> np.ndarray:
    """``[C, T, n]`` or ``[N, n]`` → ``[N, n]`` float64."""
    arr = np.asarray(traces, dtype=np.float64)
    if arr.ndim == 3:
        return arr.reshape(-1, arr.shape[-1])
    if arr.ndim != 2:
        raise ValueError(f"expected traces [C, T, n] or [N, n], got shape {arr.shape}")
    return arr


def bif_from_traces(
    train_traces: np.ndarray, query_traces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """BIF = −Cov and normalised BIF = −Corr over the pooled draws: two ``[q, n]`` arrays.

    Algorithm 1's estimator, B = L (I − 11ᵀ/N)² Φᵀ / (N − 1), pooled over chains. A sample whose
    loss is constant over the draws has no defined correlation; its normalised BIF is 0.
    """
    lt, qt = _flat(train_traces), _flat(query_traces)
    if lt.shape[0] != qt.shape[0]:
        raise ValueError(f"traces have {lt.shape[0]} vs {qt.shape[0]} draws")
    n_draws = lt.shape[0]
    if n_draws < 2:
        raise ValueError("need at least 2 posterior draws for a covariance")
    lc = lt - lt.mean(axis=0)
    qc = qt - qt.mean(axis=0)
    cov = qc.T @ lc / (n_draws - 1)
    sd_q = np.sqrt((qc**2).sum(axis=0) / (n_draws - 1))
    sd_l = np.sqrt((lc**2).sum(axis=0) / (n_draws - 1))
    denom = np.outer(sd_q, sd_l)
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    return -cov, -corr


@dataclass(frozen=True)
class BIFAttribution:
    """Pairwise local BIF between queries and training samples.

    Attributes:
        bif: ``[q, n]`` −Cov(ℓ_query, ℓ_train); negative = the training image helps the query.
        normalised: ``[q, n]`` −Corr, the paper's normalised BIF in [−1, 1].
        traces: The loss traces the estimate was computed from.
    """

    bif: np.ndarray
    normalised: np.ndarray
    traces: LossTraces

    @property
    def scores(self) -> np.ndarray:
        """Cov = −BIF: HIGH = proponent, the sign convention of the other attribution scorers."""
        return -self.bif


def bif_attribution(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor,
    query_keys: Sequence[SampleKey],
    config: BIFConfig | None = None,
    *,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
    sgld_images: torch.Tensor | None = None,
    sgld_keys: Sequence[SampleKey] | None = None,
    sgld_cond: torch.Tensor | None = None,
) -> BIFAttribution:
    """Pairwise BIF ``[n_query, n_train]`` = −Cov over local-posterior draws (and −Corr).

    Arguments as :func:`loss_traces`.
    """
    traces = loss_traces(
        objective,
        model,
        train_images,
        train_keys,
        query_images,
        query_keys,
        config,
        train_cond=train_cond,
        query_cond=query_cond,
        sgld_images=sgld_images,
        sgld_keys=sgld_keys,
        sgld_cond=sgld_cond,
    )
    bif, normalised = bif_from_traces(traces.train, traces.query)
    return BIFAttribution(bif=bif, normalised=normalised, traces=traces)


def risk_from_traces(traces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior loss variance ``[n]`` (pooled over all draws) and its stderr across chains.

    Args:
        traces: ``[C, T, n]`` loss traces.

    Returns:
        ``(variance, stderr)``; stderr = std_c(Var_c) / sqrt(C), NaN for C = 1 (or T = 1).
    """
    arr = np.asarray(traces, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"expected traces [C, T, n], got shape {arr.shape}")
    n_chains, n_per, n = arr.shape
    flat = arr.reshape(-1, n)
    if flat.shape[0] < 2:
        raise ValueError("need at least 2 posterior draws for a variance")
    variance = flat.var(axis=0, ddof=1)
    if n_chains > 1 and n_per > 1:
        per_chain = arr.var(axis=1, ddof=1)
        stderr = per_chain.std(axis=0, ddof=1) / math.sqrt(n_chains)
    else:
        stderr = np.full(n, np.nan)
    return variance, stderr


def bif_risk(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: BIFConfig | None = None,
    cond: torch.Tensor | None = None,
    *,
    sgld_images: torch.Tensor | None = None,
    sgld_keys: Sequence[SampleKey] | None = None,
    sgld_cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Risk = posterior loss variance Var_γ(ℓ_i) = −self-BIF (HIGH = risky).

    ``stderr`` is across chains (see :func:`risk_from_traces`); ``per_layer`` and
    ``per_timestep`` are None (the variance of the draw-mean loss does not split over timesteps).
    For shard-by-shard scoring pass the same ``sgld_*`` set for every shard.
    """
    config = config or BIFConfig()
    traces = loss_traces(
        objective,
        model,
        images,
        sample_keys,
        config=config,
        train_cond=cond,
        sgld_images=sgld_images,
        sgld_keys=sgld_keys,
        sgld_cond=sgld_cond,
    )
    return risk_result(objective, traces.train, sample_keys, config)


def risk_result(
    objective: DiffusionObjective,
    traces: np.ndarray,
    sample_keys: Sequence[SampleKey],
    config: BIFConfig,
) -> ScoreResult:
    """The risk :class:`ScoreResult` of ``[C, T, n]`` loss traces, however they were evaluated.

    One constructor for :func:`bif_risk` and the corpus paths (stored or replayed states), so
    their results are comparable field by field.
    """
    variance, stderr = risk_from_traces(traces)
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=variance,
        stderr=stderr,
        per_layer=None,
        layer_names=(),
        per_timestep=None,
        timesteps=objective.schedule.timesteps,
        method=f"bif/posterior-loss-variance/sgld-{config.gradient_draws}",
    )
