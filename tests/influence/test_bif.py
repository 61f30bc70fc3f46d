"""Local Bayesian influence functions: the SGLD sampler against a closed-form Gaussian posterior,
the BIF against numpy covariances of the stored traces, determinism and model safety.

Linear-Gaussian model
---------------------
The denoiser is linear, f_θ(x) = W x + b on D-dimensional inputs, θ = (vec_row(W), b) ∈ R^P with
P = D² + D. For item (i, j) (sample i, keyed draw j) the output is A_ij θ with the D×P design
A_ij = [I_D ⊗ x_ijᵀ, I_D] (x_ij = x_t of the draw) and the target is y_ij (= ε_ij). The
per-sample loss on the keyed draws is a quadratic,

    ℓ_i(θ) = (1/(K D)) Σ_j ‖A_ij θ − y_ij‖² = θᵀ Q_i θ − 2 r_iᵀ θ + s_i,
    Q_i = (1/(K D)) Σ_j A_ijᵀ A_ij,   r_i = (1/(K D)) Σ_j A_ijᵀ y_ij,

i.e. a Gaussian negative log-likelihood with variance D/2 per output element (up to a
constant). With ``gradient_draws="keyed"`` and a full batch (m = n) the SGLD drift is the exact
gradient of the potential

    U(θ) = (nβ/n) Σ_i ℓ_i(θ) + (γ/2) ‖θ − θ*‖²,

so the localised posterior p_γ ∝ exp(−U) is Gaussian with precision and mean

    Λ = (2 nβ / n) Σ_i Q_i + γ I,     μ = Λ⁻¹ ( (2 nβ / n) Σ_i r_i + γ θ* ).

The SGLD update θ' = θ − (ε/2) ∇U(θ) + sqrt(ε) ξ = θ − (ε/2) Λ (θ − μ) + sqrt(ε) ξ is then an exact
AR(1) recursion with coefficient A = I − εΛ/2. Its stationary law is N(μ, Σ_ε) with
Σ_ε = A Σ_ε A + ε I, i.e. in the eigenbasis of Λ (eigenvalue λ):

    σ²_ε(λ) = ε / (1 − (1 − ελ/2)²) = 1 / (λ (1 − ελ/4)),   Σ_ε = (Λ (I − εΛ/4))⁻¹ → Λ⁻¹ (ε → 0).

Tolerance. Whiten the draws in the eigenbasis, z_k = sqrt(λ_k (1 − ελ_k/4)) v_kᵀ (θ − μ): the
z_k are independent stationary AR(1) processes with unit variance and coefficient
a_k = 1 − ελ_k/2. For N = C·T draws the sample covariance S of z has, asymptotically,

    sd(S_kk) = sqrt(2/N · (1 + a_k²)/(1 − a_k²)),
    sd(S_kl) = sqrt(1/N · (1 + a_k a_l)/(1 − a_k a_l)),
    sd(mean z_k) = sqrt(1/N · (1 + a_k)/(1 − a_k)),

(the variance of a sample (co)variance of Gaussian AR(1) series, inflated by the integrated
autocorrelation). We require every entry within 5 sd of its target (P(P+3)/2 = 27 statistics for
P = 6: a false alarm has probability ≈ 27 × 6e-7). The step size is chosen large (ελ ∈ [0.65, 1])
so the draws decorrelate in a few steps: the test then resolves the O(ε) discretisation bias
(the same statistics against the continuous posterior Λ⁻¹ exceed 15 sd: variances 19-33% too
large) while matching Σ_ε, the posterior covariance with its exact step-size correction, within
5 sd; a mis-scaled nβ, γ or noise variance fails (see ``NBETA``). A second, smaller-ε run
matches Λ⁻¹ itself within sampling error plus the bias bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from diffcurate.influence.bif import (
    BIFConfig,
    bif_attribution,
    bif_from_traces,
    bif_risk,
    loss_traces,
    risk_from_traces,
    sgld_chains,
)
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from tiny_unets import captions, images, scheduler, tiny_cond_unet, tiny_mlp, tiny_unet

D = 2
N_SAMPLES = 6
Z_MAX = 5.0


class LinearDenoiser(nn.Module):
    """f(x) = W x + b on flattened inputs, with the diffusers call signature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        out = self.lin(sample.flatten(1)).reshape(sample.shape)
        return UNet2DOutput(sample=out)


def linear_model(seed: int = 0) -> LinearDenoiser:
    torch.manual_seed(seed)
    return LinearDenoiser(D).double().eval()


def objective(timesteps=(50, 300), draws=1, seed=0) -> DiffusionObjective:
    return DiffusionObjective(
        scheduler(), TimestepSchedule(timesteps=timesteps, draws_per_sample=draws), seed=seed
    )


def flat_params(net: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy().copy()


def quadratic_forms(obj: DiffusionObjective, x: torch.Tensor, keys: list):
    """(Q [n, P, P], r [n, P], s [n]) with ℓ_i(θ) = θᵀQ_iθ − 2r_iᵀθ + s_i (module docstring)."""
    batch = obj.prepare(x, keys, torch.float64, torch.device("cpu"))
    k = batch.n_draws
    xt = batch.x_t.reshape(len(keys), k, D).numpy()
    y = batch.target.reshape(len(keys), k, D).numpy()
    p = D * D + D
    q = np.zeros((len(keys), p, p))
    r = np.zeros((len(keys), p))
    s = np.zeros(len(keys))
    for i in range(len(keys)):
        for j in range(k):
            a = np.hstack([np.kron(np.eye(D), xt[i, j][None, :]), np.eye(D)])
            q[i] += a.T @ a / (k * D)
            r[i] += a.T @ y[i, j] / (k * D)
            s[i] += y[i, j] @ y[i, j] / (k * D)
    return q, r, s


def posterior(q, r, theta_star, nbeta, gamma):
    """Precision Λ and mean μ of p_γ (module docstring)."""
    n, p = r.shape
    lam = 2 * nbeta / n * q.sum(axis=0) + gamma * np.eye(p)
    mu = np.linalg.solve(lam, 2 * nbeta / n * r.sum(axis=0) + gamma * theta_star)
    return lam, mu


def whitened_z_scores(draws: np.ndarray, mu, lam, eps, target: str):
    """Max |z| of the sample mean and covariance of whitened draws (module docstring).

    ``target="sgld"`` whitens with Σ_ε (the chain's exact stationary covariance);
    ``target="posterior"`` with Λ⁻¹ (the ε → 0 posterior), for which the whitened covariance is
    diag(1/(1 − ελ/4)) ≠ I: that shows the test's power to resolve the O(ε) bias.
    """
    evals, evecs = np.linalg.eigh(lam)
    scale = evals * (1 - eps * evals / 4) if target == "sgld" else evals
    z = (draws - mu) @ evecs * np.sqrt(scale)
    n = z.shape[0]
    a = 1 - eps * evals / 2
    mean_sd = np.sqrt((1 + a) / (1 - a) / n)
    zc = z - z.mean(axis=0)
    cov = zc.T @ zc / (n - 1)
    aa = np.outer(a, a)
    cov_sd = np.sqrt((1 + aa) / (1 - aa) / n)
    cov_sd[np.diag_indices_from(cov_sd)] *= math.sqrt(2)
    z_mean = np.abs(z.mean(axis=0)) / mean_sd
    z_cov = np.abs(cov - np.eye(len(evals))) / cov_sd
    return float(z_mean.max()), float(z_cov.max()), cov


def run_linear_chains(config: BIFConfig, seed_model: int = 0):
    obj = objective()
    model = linear_model(seed_model)
    x = images(N_SAMPLES, (1, 1, D), seed=3)
    keys = [f"s{i}" for i in range(N_SAMPLES)]
    draws = np.zeros((config.chains, config.draws, D * D + D))

    def observe(c, k, net):
        draws[c, k] = flat_params(net)

    sgld_chains(obj, model, x, keys, observe, config)
    q, r, s = quadratic_forms(obj, x, keys)
    lam, mu = posterior(q, r, flat_params(model), config.nbeta, config.localization)
    return draws, (q, r, s), lam, mu, (obj, model, x, keys)


# nβ is set so the data term contributes 8-40% of the posterior precision (γ = 100). Measured
# power of the first test (max z of mean / covariance; the test requires < 5): correct sampler
# 0.6 / 1.7; the same draws judged against a posterior with 2·nβ 147 / 16, nβ/2 68 / 6.9, 2·γ
# 136 / 32, or noise variance 2ε 0.8 / 23.
NBETA = 60.0


def linear_config(lam_scale: float, **kwargs) -> BIFConfig:
    return BIFConfig(
        step_size=1.0 / lam_scale,
        localization=100.0,
        nbeta=NBETA,
        batch_size=N_SAMPLES,
        gradient_draws="keyed",
        dtype="float64",
        **kwargs,
    )


def test_sgld_matches_the_exact_stationary_law_of_the_linear_gaussian_posterior():
    probe = linear_config(1.0, chains=1, draws=1)
    obj = objective()
    x = images(N_SAMPLES, (1, 1, D), seed=3)
    q, r, _ = quadratic_forms(obj, x, [f"s{i}" for i in range(N_SAMPLES)])
    lam, _ = posterior(q, r, flat_params(linear_model()), probe.nbeta, probe.localization)
    evals = np.linalg.eigvalsh(lam)
    assert evals.min() >= 100.0 and 1.3 < evals.max() / evals.min() < 2.5, evals
    eps = 1.0 / evals.max()  # ελ ∈ [~0.5, 1]: AR coefficients ≤ 0.75

    config = linear_config(evals.max(), chains=2, draws=5000, burn_in=60)
    draws, _, lam, mu, _ = run_linear_chains(config)
    flat = draws.reshape(-1, draws.shape[-1])
    z_mean, z_cov, _ = whitened_z_scores(flat, mu, lam, eps, "sgld")
    assert z_mean < Z_MAX and z_cov < Z_MAX, (z_mean, z_cov)

    # Power: the same draws are clearly NOT distributed as the ε → 0 posterior N(μ, Λ⁻¹) at this
    # step size (variance inflated by 1/(1 − ελ/4), up to 33%): the statistic resolves the bias.
    _, z_cov_post, cov_post = whitened_z_scores(flat, mu, lam, eps, "posterior")
    assert z_cov_post > 3 * Z_MAX, z_cov_post
    expected = 1 / (1 - eps * np.linalg.eigvalsh(lam) / 4)
    np.testing.assert_allclose(np.diag(cov_post), expected, rtol=0.1)


def test_sgld_at_small_step_matches_the_analytic_posterior_covariance():
    """ε·λ_max = 0.2: Σ_ε differs from Λ⁻¹ by at most ελ/4/(1 − ελ/4) = 5.3% (the bias bound).

    Tolerance on the relative error of Σ along each eigen-direction of Λ: that bias plus 5 sd of
    the variance estimate, sd = sqrt(2/N · (1 + a²)/(1 − a²)) with a = 1 − ελ/2.
    """
    obj = objective()
    x = images(N_SAMPLES, (1, 1, D), seed=3)
    q, r, _ = quadratic_forms(obj, x, [f"s{i}" for i in range(N_SAMPLES)])
    lam0, _ = posterior(q, r, flat_params(linear_model()), NBETA, 100.0)
    lam_max = np.linalg.eigvalsh(lam0).max()
    config = linear_config(lam_max / 0.2, chains=2, draws=4000, burn_in=200)
    eps = config.step_size
    draws, _, lam, mu, _ = run_linear_chains(config)
    flat = draws.reshape(-1, draws.shape[-1])
    evals, evecs = np.linalg.eigh(lam)
    proj = (flat - flat.mean(axis=0)) @ evecs
    var = proj.var(axis=0, ddof=1) * evals  # = 1 for an exact N(μ, Λ⁻¹)
    a = 1 - eps * evals / 2
    sd = np.sqrt(2 / flat.shape[0] * (1 + a**2) / (1 - a**2))
    bias = eps * evals / 4 / (1 - eps * evals / 4)
    assert np.all(np.abs(var - 1) <= bias + Z_MAX * sd), (var, bias, sd)
    z_mean, _, _ = whitened_z_scores(flat, mu, lam, eps, "sgld")
    assert z_mean < Z_MAX, z_mean
    inv = np.linalg.inv(lam)
    rel = np.linalg.norm(np.cov(flat.T) - inv) / np.linalg.norm(inv)
    assert rel < 0.15, rel


def test_bif_of_the_linear_gaussian_model_matches_the_closed_form_covariance():
    """Cov(ℓ_i, ℓ_j) of quadratic forms under N(μ, Σ): 2 tr(Q_iΣQ_jΣ) + 4 g_iᵀ Σ g_j, g = Qμ − r.

    The traces come from ``loss_traces`` (the package's bookkeeping of draws and chains); Σ is the
    chain's exact stationary covariance Σ_ε. Tolerance: 5 batch-means standard errors (20
    batches of consecutive draws per chain; batches are much longer than the ≤ 4-step
    autocorrelation time) plus 1e-3 of the scale.
    """
    obj = objective()
    x = images(N_SAMPLES, (1, 1, D), seed=3)
    keys = [f"s{i}" for i in range(N_SAMPLES)]
    model = linear_model()
    q, r, _ = quadratic_forms(obj, x, keys)
    lam0, _ = posterior(q, r, flat_params(model), NBETA, 100.0)
    config = linear_config(np.linalg.eigvalsh(lam0).max(), chains=2, draws=2000, burn_in=60)
    eps = config.step_size
    lam, mu = posterior(q, r, flat_params(model), NBETA, 100.0)
    evals, evecs = np.linalg.eigh(lam)
    sigma = evecs @ np.diag(1 / (evals * (1 - eps * evals / 4))) @ evecs.T

    train, query = keys[:4], keys[4:]
    res = bif_attribution(
        obj, model, x[:4], train, x[4:], query, config, sgld_images=x, sgld_keys=keys
    )
    g = q @ mu - r
    expected = np.array(
        [
            [2 * np.trace(q[a] @ sigma @ q[b] @ sigma) + 4 * g[a] @ sigma @ g[b] for b in range(4)]
            for a in range(4, N_SAMPLES)
        ]
    )
    batches = [
        bif_from_traces(tr_b, q_b)[0]
        for tr, qt in zip(res.traces.train, res.traces.query, strict=True)
        for tr_b, q_b in zip(np.array_split(tr, 20), np.array_split(qt, 20), strict=True)
    ]
    se = np.std(batches, axis=0, ddof=1) / math.sqrt(len(batches))
    err = np.abs(-res.bif - expected)
    assert np.all(err <= Z_MAX * se + 1e-3 * np.abs(expected).max()), (err / se).max()
    # The closed form is resolved well beyond the sampling error, and matched as a whole.
    assert np.abs(expected).max() > 10 * se.max()
    assert np.linalg.norm(-res.bif - expected) / np.linalg.norm(expected) < 0.1


# ------------------------------------------------------------------------------ bookkeeping
def small_config(**kwargs) -> BIFConfig:
    base = {
        "step_size": 1e-4,
        "localization": 1e3,
        "nbeta": 50.0,
        "chains": 3,
        "draws": 6,
        "burn_in": 2,
        "thinning": 2,
        "batch_size": 4,
        "dtype": "float64",
    }
    base.update(kwargs)
    return BIFConfig(**base)


@pytest.fixture(scope="module")
def mlp_setup():
    obj = objective(timesteps=(20, 200))
    model = tiny_mlp()
    x = images(8, (1, 3, 3), seed=5)
    keys = [f"img{i}" for i in range(8)]
    return obj, model, x, keys


def test_traces_are_the_losses_at_the_recorded_sgld_states():
    """loss_traces evaluates each sample's keyed-draw loss at exactly w_{c, b + k·thinning}."""
    obj = objective()
    model = linear_model()
    x = images(N_SAMPLES, (1, 1, D), seed=3)
    keys = [f"s{i}" for i in range(N_SAMPLES)]
    config = BIFConfig(
        step_size=1e-3, localization=100.0, nbeta=60.0, chains=2, draws=5, burn_in=3,
        thinning=2, batch_size=3, dtype="float64",
    )  # fmt: skip
    states = {}

    def observe(c, k, net):
        states[(c, k)] = flat_params(net)

    sgld_chains(obj, model, x, keys, observe, config)
    assert sorted(states) == [(c, k) for c in range(2) for k in range(5)]
    traces = loss_traces(obj, model, x[:4], keys[:4], x[4:], keys[4:], config,
                         sgld_images=x, sgld_keys=keys)  # fmt: skip
    q, r, s = quadratic_forms(obj, x, keys)
    for (c, k), theta in states.items():
        losses = np.einsum("p,ipq,q->i", theta, q, theta) - 2 * r @ theta + s
        np.testing.assert_allclose(traces.train[c, k], losses[:4], rtol=1e-10)
        np.testing.assert_allclose(traces.query[c, k], losses[4:], rtol=1e-10)
    # Algorithm 1 with b = 0: the first draw of every chain is w* itself.
    w_star = loss_traces(obj, model, x, keys, config=config.model_copy(update={"burn_in": 0}))
    base = np.einsum("p,ipq,q->i", flat_params(model), q, flat_params(model))
    base = base - 2 * r @ flat_params(model) + s
    np.testing.assert_allclose(w_star.train[:, 0], np.tile(base, (2, 1)), rtol=1e-12)
    assert w_star.sgld_loss.shape == (2, config.model_copy(update={"burn_in": 0}).n_steps + 1)


def test_bif_is_minus_the_numpy_covariance_of_the_traces(mlp_setup):
    obj, model, x, keys = mlp_setup
    res = bif_attribution(obj, model, x[:6], keys[:6], x[6:], keys[6:], small_config())
    tr = res.traces.train.reshape(-1, 6)
    qt = res.traces.query.reshape(-1, 2)
    assert tr.shape[0] == 3 * 6 and np.isfinite(tr).all()
    full = np.cov(np.hstack([qt, tr]).T)  # rows = variables, pooled over chains and draws
    np.testing.assert_allclose(res.bif, -full[:2, 2:], rtol=1e-10, atol=1e-20)
    corr = np.corrcoef(np.hstack([qt, tr]).T)
    np.testing.assert_allclose(res.normalised, -corr[:2, 2:], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.scores, -res.bif)
    assert np.abs(res.bif).max() > 0  # the chain moved: losses vary over the draws


def test_risk_is_the_posterior_loss_variance_with_stderr_across_chains(mlp_setup):
    obj, model, x, keys = mlp_setup
    config = small_config()
    res = bif_risk(obj, model, x, keys, config)
    traces = loss_traces(obj, model, x, keys, config=config)
    flat = traces.train.reshape(-1, len(keys))
    np.testing.assert_allclose(res.score, flat.var(axis=0, ddof=1), rtol=1e-12)
    per_chain = traces.train.var(axis=1, ddof=1)
    np.testing.assert_allclose(res.stderr, per_chain.std(axis=0, ddof=1) / math.sqrt(3))
    assert res.sample_keys == tuple(keys) and res.method.startswith("bif/")
    # Self-BIF is minus the variance.
    bif, _ = bif_from_traces(traces.train, traces.train)
    np.testing.assert_allclose(np.diag(bif), -res.score, rtol=1e-12)
    one_chain = risk_from_traces(traces.train[:1])[1]
    assert np.isnan(one_chain).all()


def test_deterministic_under_a_seed_and_seed_sensitive(mlp_setup):
    obj, model, x, keys = mlp_setup
    for mode in ("fresh", "keyed"):
        a = loss_traces(obj, model, x, keys, config=small_config(gradient_draws=mode))
        b = loss_traces(obj, model, x, keys, config=small_config(gradient_draws=mode))
        c = loss_traces(obj, model, x, keys, config=small_config(gradient_draws=mode, seed=1))
        assert np.array_equal(a.train, b.train) and np.array_equal(
            a.sgld_loss, b.sgld_loss, equal_nan=True
        )
        assert not np.allclose(a.train[:, 1:], c.train[:, 1:])


def test_shard_scores_equal_one_shot_scores_with_a_fixed_sgld_set(mlp_setup):
    obj, model, x, keys = mlp_setup
    config = small_config()
    full = bif_risk(obj, model, x, keys, config, sgld_images=x, sgld_keys=keys)
    parts = [
        bif_risk(obj, model, x[sl], keys[sl], config, sgld_images=x, sgld_keys=keys)
        for sl in (slice(0, 3), slice(3, 8))
    ]
    np.testing.assert_allclose(np.concatenate([p.score for p in parts]), full.score, rtol=1e-10)


def test_the_callers_model_is_not_modified(mlp_setup):
    obj, _, x, keys = mlp_setup
    model = tiny_mlp(seed=4).float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    traces = loss_traces(obj, model, x, keys, config=small_config(step_size=1e-2))
    assert np.abs(np.diff(traces.train, axis=1)).max() > 0  # the private copy did move
    after = model.state_dict()
    assert all(
        torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in after
    )
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_frozen_parameters_are_not_sampled(mlp_setup):
    obj, _, x, keys = mlp_setup
    model = tiny_mlp()
    for p in model.inp.parameters():
        p.requires_grad_(False)
    frozen = {}

    def observe(c, k, net):
        frozen[(c, k)] = net.inp.weight.detach().clone()

    sgld_chains(obj, model, x, keys, observe, small_config(step_size=1e-2))
    assert all(torch.equal(w, model.inp.weight) for w in frozen.values())


def test_divergence_raises_a_clear_error(mlp_setup):
    obj, model, x, keys = mlp_setup
    config = small_config(step_size=1e10, localization=1e10)
    with pytest.raises(FloatingPointError, match="step_size"):
        loss_traces(obj, model, x, keys, config=config)


def test_runs_on_diffusers_unets_with_and_without_conditioning():
    obj = objective(timesteps=(100,))
    x = images(4, (1, 8, 8), seed=6)
    keys = list(range(4))
    cfg = small_config(chains=2, draws=3, burn_in=0, thinning=1, batch_size=2)
    res = bif_risk(obj, tiny_unet(), x, keys, cfg)
    assert np.isfinite(res.score).all() and (res.score > 0).all()
    cond = captions(4)
    att = bif_attribution(
        obj, tiny_cond_unet(), x[:3], keys[:3], x[3:], keys[3:],
        cfg.model_copy(update={"gradient_draws": "keyed"}), train_cond=cond[:3],
        query_cond=cond[3:],
    )  # fmt: skip
    assert att.bif.shape == (1, 3) and np.isfinite(att.bif).all()


def test_config_rejects_bad_values_and_counts_steps():
    with pytest.raises(ValueError):
        BIFConfig(step_size=0)
    with pytest.raises(ValueError):
        BIFConfig(chains=0)
    cfg = BIFConfig(draws=4, burn_in=3, thinning=2)
    assert cfg.n_steps == 3 + 3 * 2
    assert [cfg.is_recorded(s) for s in range(10)] == [None] * 3 + [0, None, 1, None, 2, None, 3]
