"""TRAK / D-TRAK against dense per-sample gradients on a tiny float64 MLP.

Reference: G ∈ R^{n×d} stacks the per-sample gradients g_i = ∇_θ m(x_i) computed by plain
autograd, one sample at a time (no vmap, no projection). For a projection P ∈ R^{d×k} with
k ≥ d and full row rank, the push-through identity

    P (Pᵀ A P + λ I_k)⁻¹ Pᵀ = (A + λ (P Pᵀ)⁻¹)⁻¹,   A = GᵀG,

makes TRAK's φ_qᵀ(ΦᵀΦ + λI)⁻¹φ_n EXACTLY g_qᵀ(GᵀG + λ(PPᵀ)⁻¹)⁻¹g_n for every λ (checked to 1e-9),
and, with A of full rank and λ small against its smallest eigenvalue, the exact empirical-Fisher
influence g_qᵀ(GᵀG + λI)⁻¹g_n: the two differ by O(λ ‖(PPᵀ)⁻¹ − I‖ / λ_min(A)), here < 1e-6
relative. The model is 55 parameters and the training set 120 samples with random timesteps
(a fixed timestep list would leave the time-embedding weights rank deficient), so GᵀG is full
rank (condition number ~1e6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.trak import (
    Projector,
    TRAKConfig,
    damping_value,
    fisher_kernel,
    per_sample_gradients,
    trak_attribution,
    trak_features,
    trak_risk,
    trak_scores,
    trak_self_influence,
)
from tiny_unets import TinyDenoiser, images, scheduler

N_TRAIN, N_QUERY = 120, 5


def small_mlp(seed: int = 0) -> TinyDenoiser:
    torch.manual_seed(seed)
    model = TinyDenoiser(channels=1, size=2, hidden=3).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    return model


def objective(prediction_type: str = "epsilon") -> DiffusionObjective:
    schedule = TimestepSchedule(band=(10, 900), draws_per_sample=2)
    return DiffusionObjective(scheduler(prediction_type), schedule, seed=0)


def dense_gradients(obj, model, x, keys, measurement: str) -> np.ndarray:
    """[n, d] per-sample gradients of the draw-mean measurement, one autograd call per sample."""
    batch = obj.prepare(x, keys, torch.float64, torch.device("cpu"))
    k = batch.n_draws
    params = list(model.parameters())
    ab = obj.scheduler.alphas_cumprod.double()
    rows = []
    for i in range(len(keys)):
        sl = slice(i * k, (i + 1) * k)
        out = model(batch.x_t[sl], batch.t[sl]).sample
        if measurement == "loss":
            per_draw = (out - batch.target[sl]).square().flatten(1).mean(dim=1)
        else:
            eps_hat = out
            if obj.prediction_type == "v_prediction":
                a = ab[batch.t[sl]].reshape(-1, 1, 1, 1)
                eps_hat = a.sqrt() * out + (1 - a).sqrt() * batch.x_t[sl]
            per_draw = eps_hat.square().flatten(1).mean(dim=1)
        grads = torch.autograd.grad(per_draw.mean(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).numpy()


@pytest.fixture(scope="module")
def data():
    obj = objective()
    model = small_mlp()
    x = images(N_TRAIN + N_QUERY, (1, 2, 2), seed=7)
    keys = [f"t{i}" for i in range(N_TRAIN)] + [f"q{i}" for i in range(N_QUERY)]
    grads = {m: dense_gradients(obj, model, x, keys, m) for m in ("loss", "square")}
    return obj, model, x, keys, grads


def config(**kwargs) -> TRAKConfig:
    return TRAKConfig(dtype="float64", **kwargs)


def test_projector_is_seeded_scaled_and_chunk_invariant():
    d, k = 300, 64
    p1 = Projector.from_config(d, config(proj_dim=k, projection_block=128, seed=3))
    mat = p1.matrix()
    assert mat.shape == (d, k)
    assert set((mat * k**0.5).unique().tolist()) == {-1.0, 1.0}
    uncached = Projector.from_config(
        d, config(proj_dim=k, projection_block=128, seed=3, projection_cache=0)
    )
    assert torch.equal(uncached.matrix(), mat)
    other = Projector.from_config(d, config(proj_dim=k, projection_block=128, seed=4)).matrix()
    assert not torch.equal(other, mat)
    g = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p1.project(g), g @ mat, rtol=1e-12, atol=1e-12)
    gauss = Projector.from_config(d, config(proj_dim=4096, projection="gaussian")).matrix()
    # E[P Pᵀ] = I: diagonal ≈ 1 within a few times sqrt(2/k).
    pp = gauss @ gauss.T
    assert (pp.diagonal() - 1).abs().max() < 6 * (2 / 4096) ** 0.5


def test_vmapped_gradients_equal_dense_autograd(data):
    obj, model, x, keys, grads = data
    for m in ("loss", "square"):
        g = per_sample_gradients(obj, model, x[:10], keys[:10], config(measurement=m, batch_size=3))
        np.testing.assert_allclose(g.numpy(), grads[m][:10], rtol=1e-10, atol=1e-14)


def test_features_equal_dense_projection_whatever_the_projection_buffer(data):
    obj, model, x, keys, grads = data
    p = Projector.from_config(grads["loss"].shape[1], config(proj_dim=16, seed=2)).matrix()
    expected = grads["loss"][:11] @ p.numpy()
    for buffer in (0, 55 * 6, 1 << 20):  # one batch per pass, two batches, everything
        cfg = config(
            proj_dim=16, seed=2, batch_size=3, projection_cache=0, projection_buffer=buffer
        )
        feats = trak_features(obj, model, x[:11], keys[:11], cfg)
        np.testing.assert_allclose(feats, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("measurement", ["loss", "square"])
@pytest.mark.parametrize("proj_dim", [55, 256])
def test_trak_with_k_ge_d_is_the_damped_fisher_influence_exactly(data, measurement, proj_dim):
    obj, model, x, keys, grads = data
    lam = 0.3  # large on purpose: the λ(PPᵀ)⁻¹ form is exact for every λ
    cfg = config(measurement=measurement, proj_dim=proj_dim, damping=lam, seed=1)
    scores = trak_attribution(
        obj, model, x[:N_TRAIN], keys[:N_TRAIN], x[N_TRAIN:], keys[N_TRAIN:], cfg
    )
    g = grads[measurement]
    gt, gq = g[:N_TRAIN], g[N_TRAIN:]
    p = Projector.from_config(g.shape[1], cfg).matrix().numpy()
    expected = gq @ np.linalg.solve(gt.T @ gt + lam * np.linalg.inv(p @ p.T), gt.T)
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("measurement", ["loss", "square"])
def test_trak_with_k_ge_d_equals_the_exact_empirical_fisher_influence(data, measurement):
    """gᵀ(GᵀG + λI)⁻¹g with λ = 1e-6 × the smallest non-zero eigenvalue of GᵀG: TRAK matches it
    to < 1e-6 relative.

    For D-TRAK's ‖ε̂‖² GᵀG is singular by symmetry: the measurement is invariant under rotations
    of the output space, (W_out, b_out) → (I + Ω)(W_out, b_out) with Ω antisymmetric, so every
    gradient is orthogonal to those D(D−1)/2 = 6 directions. Queries are orthogonal to them too,
    so both expressions have the same λ → 0 limit g_qᵀ(GᵀG)⁺g_n and the comparison still holds.
    """
    obj, model, x, keys, grads = data
    g = grads[measurement]
    d = g.shape[1]
    gt, gq = g[:N_TRAIN], g[N_TRAIN:]
    fisher = gt.T @ gt
    evals = np.linalg.eigvalsh(fisher)
    nonzero = evals[evals > 1e-10 * evals.max()]
    assert len(nonzero) == (d if measurement == "loss" else d - 6)
    lam = 1e-6 * nonzero.min()
    exact = gq @ np.linalg.solve(fisher + lam * np.eye(d), gt.T)
    exact_self = np.einsum("nd,dn->n", gt, np.linalg.solve(fisher + lam * np.eye(d), gt.T))
    cfg = config(measurement=measurement, proj_dim=128, damping=lam, seed=2)
    train = trak_features(obj, model, x[:N_TRAIN], keys[:N_TRAIN], cfg)
    query = trak_features(obj, model, x[N_TRAIN:], keys[N_TRAIN:], cfg)
    kernel = fisher_kernel(train)
    scores = trak_scores(query, train, kernel, lam)
    rel = np.linalg.norm(scores - exact) / np.linalg.norm(exact)
    print(f"relative error vs exact Fisher influence: {rel:.2e}")
    assert rel < 1e-6, rel
    self_inf = trak_self_influence(train, kernel, lam)
    np.testing.assert_allclose(self_inf, exact_self, rtol=1e-6)
    # Leverage scores of the training set: in (0, 1], summing to ≈ rank(GᵀG) (tiny λ).
    assert self_inf.max() <= 1 + 1e-9 and abs(self_inf.sum() - len(nonzero)) < 1e-3

    # Power: with k < d the projection loses directions and the scores differ.
    low = config(measurement=measurement, proj_dim=16, damping=lam, seed=2)
    low_scores = trak_scores(
        trak_features(obj, model, x[N_TRAIN:], keys[N_TRAIN:], low),
        trak_features(obj, model, x[:N_TRAIN], keys[:N_TRAIN], low),
        fisher_kernel(trak_features(obj, model, x[:N_TRAIN], keys[:N_TRAIN], low)),
        lam,
    )
    assert np.linalg.norm(low_scores - exact) / np.linalg.norm(exact) > 0.1


def test_d_trak_uses_the_implied_epsilon_for_v_prediction():
    obj = objective("v_prediction")
    model = small_mlp(1)
    x = images(6, (1, 2, 2), seed=9)
    keys = [f"v{i}" for i in range(6)]
    dense = dense_gradients(obj, model, x, keys, "square")
    got = per_sample_gradients(obj, model, x, keys, config(measurement="square"))
    np.testing.assert_allclose(got.numpy(), dense, rtol=1e-10, atol=1e-14)
    loss = per_sample_gradients(obj, model, x, keys, config(measurement="loss"))
    assert not np.allclose(loss.numpy(), dense)


def test_risk_is_self_influence_and_shards_combine_through_the_kernel(data):
    obj, model, x, keys, _ = data
    cfg = config(proj_dim=32, seed=5)
    xs, ks = x[:N_TRAIN], keys[:N_TRAIN]
    feats = [
        trak_features(obj, model, xs[sl], ks[sl], cfg) for sl in (slice(0, 50), slice(50, None))
    ]
    whole = trak_features(obj, model, xs, ks, cfg)
    np.testing.assert_allclose(np.concatenate(feats), whole, rtol=1e-12, atol=1e-15)
    kernel = fisher_kernel(*feats)
    np.testing.assert_allclose(kernel, whole.T @ whole, rtol=1e-10)
    parts = [
        trak_risk(obj, model, xs[sl], ks[sl], cfg, kernel=kernel)
        for sl in (slice(0, 50), slice(50, None))
    ]
    one_shot = trak_risk(obj, model, xs, ks, cfg)
    np.testing.assert_allclose(np.concatenate([p.score for p in parts]), one_shot.score, rtol=1e-9)
    np.testing.assert_allclose(one_shot.score, trak_self_influence(whole, kernel, None), rtol=1e-9)
    assert one_shot.method.startswith("trak/") and np.isnan(one_shot.stderr).all()
    # Default damping: a thousandth of the kernel's mean eigenvalue.
    assert damping_value(kernel, None) == pytest.approx(1e-3 * np.trace(kernel) / 32)


def test_singular_kernel_without_damping_fails_clearly(data):
    obj, model, x, keys, _ = data
    cfg = config(proj_dim=64, damping=0.0)
    feats = trak_features(obj, model, x[:10], keys[:10], cfg)  # 10 samples < k = 64
    with pytest.raises(np.linalg.LinAlgError, match="damping"):
        trak_self_influence(feats, fisher_kernel(feats), 0.0)
