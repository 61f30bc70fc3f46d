"""DMin sketches: the compression operator, per-sample gradients, and attribution scores.

The bound used throughout (module docstring of ``diffcurate.influence.dmin``): for unit a, b and
the pad → permute → sign → group-sum operator S to v dimensions,

    E⟨Sa, Sb⟩ = ⟨a, b⟩,
    Var⟨Sa, Sb⟩ = (1 + ⟨a,b⟩² − 2Σ a_j² b_j²)/v · (L_pad − v)/(L_pad − 1) ≤ 2/v,

and for dense vectors |⟨Sa, Sb⟩ − ⟨a, b⟩| ≤ 6·sqrt(2/v) with overwhelming probability.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffcurate.influence.dmin import (
    SHARED_NOISE_KEY,
    DMinConfig,
    SketchOperator,
    attribute,
    attribution_scores,
    compress,
    evenly_spaced_timesteps,
    exact_attribution,
    inner_product_std_bound,
    per_timestep_gradients,
    sketch_gradients,
    top_k,
)
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from tiny_unets import captions, images, scheduler, tiny_cond_unet, tiny_mlp, tiny_unet

F64 = {"dtype": "float64"}
C_BOUND = 6.0


def objective(timesteps=(10, 400), draws=1, seed=0) -> DiffusionObjective:
    schedule = TimestepSchedule(timesteps=timesteps, draws_per_sample=draws)
    return DiffusionObjective(scheduler(), schedule, seed=seed)


def predicted_variance(a: torch.Tensor, b: torch.Tensor, v: int, padded: int) -> torch.Tensor:
    """OPORP variance of ⟨Sa, Sb⟩ for every pair of unit rows of a ``[p, L]`` and b ``[q, L]``."""
    rho = a @ b.T
    cross = a.square() @ b.square().T
    return (1 + rho.square() - 2 * cross) / v * (padded - v) / (padded - 1)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------ operator
def test_compress_is_linear_and_equals_its_dense_matrix():
    n_params, v = 1000, 64  # 1000 is not a multiple of 64: padding to 1024 is exercised
    op = SketchOperator.create(n_params, v, seed=3, dtype=torch.float64)
    assert (op.padded_len, op.group_size) == (1024, 16)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, n_params, generator=gen, dtype=torch.float64)
    mat = op.dense_matrix()
    # One ±1 per column: every gradient entry lands in exactly one group with one sign.
    assert torch.equal(mat.abs().sum(dim=0), torch.ones(n_params, dtype=torch.float64))
    assert set(mat.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert mat.abs().sum(dim=1).max() <= op.group_size
    torch.testing.assert_close(compress(a, op), mat @ a, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        compress(2.5 * a - 0.75 * b, op), 2.5 * compress(a, op) - 0.75 * compress(b, op)
    )
    batch = torch.stack([a, b]).reshape(2, 1, n_params).expand(2, 3, n_params)
    torch.testing.assert_close(
        compress(batch, op), (mat @ batch.reshape(-1, n_params).T).T.reshape(2, 3, v)
    )


def test_compress_follows_the_papers_four_steps():
    """pad → permute → Rademacher sign → sum of v groups of m consecutive entries, by hand."""
    n_params, v = 10, 4
    op = SketchOperator.create(n_params, v, seed=1, dtype=torch.float64)
    g = torch.arange(1.0, n_params + 1, dtype=torch.float64)
    padded = [*g.tolist(), 0.0, 0.0]  # L_pad = 12, the smallest multiple of 4 >= 10
    permuted = [padded[i] for i in op.permutation.tolist()]
    signed = [s * y for s, y in zip(op.signs.tolist(), permuted, strict=True)]
    expected = [sum(signed[3 * b : 3 * b + 3]) for b in range(v)]
    assert compress(g, op).tolist() == pytest.approx(expected, abs=1e-12)
    assert sorted(op.permutation.tolist()) == list(range(12))


def test_operator_depends_only_on_seed_and_shape():
    a = SketchOperator.create(500, 32, seed=7)
    b = SketchOperator.create(500, 32, seed=7)
    c = SketchOperator.create(500, 32, seed=8)
    assert torch.equal(a.permutation, b.permutation) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.permutation, c.permutation)
    with pytest.raises(ValueError, match="operator was built for 500"):
        compress(torch.zeros(499), a)


def test_sketch_inner_products_are_unbiased_with_the_documented_variance():
    """Over 2000 operator seeds, for one correlated non-negative pair (where dropping the sign
    flip would add a large positive bias and the wrong grouping would change the variance)."""
    n_params, v, seeds = 2000, 64, 2000
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(n_params, generator=gen, dtype=torch.float64)
    a = unit_rows(base + 0.5 * torch.rand(n_params, generator=gen, dtype=torch.float64))
    b = unit_rows(base + 0.5 * torch.rand(n_params, generator=gen, dtype=torch.float64))
    exact = float(a @ b)
    errors = []
    for seed in range(seeds):
        op = SketchOperator.create(n_params, v, seed=seed, dtype=torch.float64)
        errors.append(float(compress(a, op) @ compress(b, op)) - exact)
    err = np.array(errors)
    var = float(predicted_variance(a[None], b[None], v, 2048))
    assert var <= 2 / v
    assert abs(err.mean()) < 4 * math.sqrt(var / seeds)
    assert err.var(ddof=1) == pytest.approx(var, rel=0.12)


def _clustered_unit_vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    """Gradient-like unit vectors: clusters with cosines ~0.3-0.8, heavy-ish tailed entries."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 8, (n,), generator=gen)
    scale = torch.exp(torch.randn(dim, generator=gen, dtype=torch.float64))  # uneven per entry
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return unit_rows((centres[labels] + 0.8 * noise) * scale)


def test_many_pairs_stay_within_the_jl_bound_at_the_default_dimension():
    n_params, v = 45_000, DMinConfig().sketch_dim  # about the tiny UNet's size; v = 2^12
    x = _clustered_unit_vectors(120, n_params, seed=1)
    op = SketchOperator.create(n_params, v, seed=0, dtype=torch.float64)
    exact = x @ x.T
    sk = compress(x, op)
    approx = sk @ sk.T
    iu = torch.triu_indices(len(x), len(x), offset=1)
    err = (approx - exact)[iu[0], iu[1]]
    bound = C_BOUND * inner_product_std_bound(v)
    assert bound == pytest.approx(6 * math.sqrt(2 / 4096))
    assert err.abs().max() <= bound
    # The typical error matches the variance formula (so the bound is not met by accident).
    pred = predicted_variance(x, x, v, op.padded_len)[iu[0], iu[1]]
    assert float(err.square().mean()) == pytest.approx(float(pred.mean()), rel=0.2)
    assert exact[iu[0], iu[1]].abs().max() > 0.3  # the pairs are far from orthogonal


def test_the_bound_test_would_catch_a_sketch_without_sign_flips():
    """Negative control: group sums without the Rademacher signs are biased for positive data."""
    n_params, v = 45_000, 4096
    x = unit_rows(torch.rand(20, n_params, generator=torch.Generator().manual_seed(2)))
    op = SketchOperator.create(n_params, v, seed=0, dtype=torch.float32)
    unsigned = SketchOperator(op.permutation, torch.ones_like(op.signs), n_params, v)
    bound = C_BOUND * inner_product_std_bound(v)
    for operator, within in ((op, True), (unsigned, False)):
        sk = compress(x, operator)
        err = (sk @ sk.T - x @ x.T).abs().max()
        assert bool(err <= bound) is within


def test_small_models_are_padded_not_truncated():
    """L < v: one entry per group, so the sketch is a signed permutation and exact."""
    op = SketchOperator.create(189, 256, seed=0, dtype=torch.float64)
    x = _clustered_unit_vectors(5, 189, seed=3)
    sk = compress(x, op)
    torch.testing.assert_close(sk @ sk.T, x @ x.T)


def test_evenly_spaced_timesteps():
    assert evenly_spaced_timesteps(10) == (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
    assert evenly_spaced_timesteps(1, 100) == (50,)
    with pytest.raises(ValueError):
        evenly_spaced_timesteps(0)


# ----------------------------------------------------------------------------- gradients
def dense_gradients(model, obj, x0, keys, noise="shared", cond=None, normalise=True):
    """Reference: per (sample, timestep) torch.autograd.grad of F.mse_loss, one item at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    draw_keys = [SHARED_NOISE_KEY] * len(keys) if noise == "shared" else keys
    d = obj.draws(draw_keys, x0.shape[1:], dtype=torch.float64)
    ab = obj.scheduler.alphas_cumprod.double()
    n_t, per_t = len(obj.schedule.timesteps), obj.schedule.draws_per_sample
    out = torch.zeros(len(keys), n_t, sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(len(keys)):
        for j in range(n_t * per_t):
            t = d.t[i, j : j + 1]
            eps = d.eps[i, j][None]
            x_t = ab[t].sqrt() * x0[i : i + 1] + (1 - ab[t]).sqrt() * eps
            kwargs = {} if cond is None else {"encoder_hidden_states": cond[i : i + 1]}
            loss = F.mse_loss(model(x_t, t, **kwargs).sample, eps)
            grads = torch.autograd.grad(loss, params)
            out[i, j // per_t] += torch.cat([g.reshape(-1) for g in grads]) / per_t
    if normalise:
        out = out / out.norm(dim=-1, keepdim=True)
    return out


def test_per_sample_gradients_equal_dense_autograd_on_the_tiny_unet():
    model, obj = tiny_unet(), objective()
    x, keys = images(3, (1, 8, 8)), ["a", "b", "c"]
    got = per_timestep_gradients(obj, model, x, keys, DMinConfig(batch_size=2, **F64))
    ref = dense_gradients(model, obj, x, keys)
    assert got.shape == (3, 2, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 2, dtype=torch.float64))
    # The two timesteps give genuinely different directions.
    assert float((got[:, 0] * got[:, 1]).sum(-1).abs().max()) < 0.99


@pytest.mark.parametrize("noise", ["shared", "per_sample"])
def test_unnormalised_gradients_and_draw_averaging_on_the_tiny_mlp(noise):
    model, obj = tiny_mlp(), objective(timesteps=(5, 300, 900), draws=2)
    x, keys = images(4, (1, 3, 3)), ["p", "q", "r", "s"]
    cfg = DMinConfig(batch_size=3, normalise=False, noise=noise, **F64)
    got = per_timestep_gradients(obj, model, x, keys, cfg)
    ref = dense_gradients(model, obj, x, keys, noise=noise, normalise=False)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    assert float(got.norm(dim=-1).std()) > 0  # raw magnitudes differ: normalisation matters


def test_conditional_unet_gradients_use_the_caption():
    model, obj = tiny_cond_unet(), objective(timesteps=(200,))
    x, keys, cond = images(2, (1, 8, 8)), ["a", "b"], captions(2)
    got = per_timestep_gradients(obj, model, x, keys, DMinConfig(**F64), cond=cond)
    torch.testing.assert_close(got, dense_gradients(model, obj, x, keys, cond=cond))
    other = per_timestep_gradients(obj, model, x, keys, DMinConfig(**F64), cond=captions(2, seed=9))
    assert not torch.allclose(got, other)


def test_sketches_are_the_compressed_normalised_gradients_and_batch_invariant():
    model, obj = tiny_unet(), objective()
    x, keys = images(4, (1, 8, 8), seed=5), ["k0", "k1", "k2", "k3"]
    cfg = DMinConfig(sketch_dim=512, seed=11, batch_size=4, **F64)
    sk = sketch_gradients(obj, model, x, keys, cfg)
    assert sk.dtype == torch.float32 and sk.shape == (4, 2, 512)
    grads = per_timestep_gradients(obj, model, x, keys, cfg)
    op = SketchOperator.create(grads.shape[-1], 512, seed=11, dtype=torch.float64)
    torch.testing.assert_close(sk, compress(grads, op).float(), rtol=0, atol=1e-7)
    for batch_size in (1, 3):
        other = sketch_gradients(
            obj, model, x, keys, cfg.model_copy(update={"batch_size": batch_size})
        )
        torch.testing.assert_close(other, sk, rtol=0, atol=1e-7)
    # A sample's sketch does not depend on which samples share its batch.
    alone = sketch_gradients(obj, model, x[2:3], keys[2:3], cfg)
    torch.testing.assert_close(alone[0], sk[2], rtol=0, atol=1e-7)


def test_sketch_scores_are_within_the_bound_of_exact_gradient_cosines():
    model, obj = tiny_unet(), objective()
    x, keys = images(6, (1, 8, 8), seed=7), [f"s{i}" for i in range(6)]
    cfg = DMinConfig(batch_size=3, **F64)  # v = 4096 < L = 44969
    sk = sketch_gradients(obj, model, x, keys, cfg)
    grads = per_timestep_gradients(obj, model, x, keys, cfg)
    bound = C_BOUND * inner_product_std_bound(cfg.sketch_dim)
    iu = torch.triu_indices(6, 6, offset=1)
    for t in range(2):
        exact = grads[:, t] @ grads[:, t].T
        approx = sk[:, t].double() @ sk[:, t].double().T
        assert float((approx - exact)[iu[0], iu[1]].abs().max()) <= bound
    exact_scores = exact_attribution(obj, model, x, keys, x[:2], ["q0", "q1"], cfg)
    torch.testing.assert_close(exact_scores, attribution_scores(grads[:2], grads))
    sketched = attribute(obj, model, x, keys, x[:2], ["q0", "q1"], cfg)
    assert float((sketched - exact_scores).abs().max()) <= 2 * bound  # T = 2 timesteps


def test_a_query_equal_to_a_training_image_attributes_to_it_first():
    """Shared noise (the paper's): identical image ⇒ identical gradients ⇒ score = T exactly."""
    model, obj = tiny_unet(), objective()
    train, keys = images(5, (1, 8, 8), seed=3), [f"t{i}" for i in range(5)]
    query = train[3:4].clone()
    cfg = DMinConfig(batch_size=2, **F64)
    exact = exact_attribution(obj, model, train, keys, query, ["gen-0"], cfg)
    assert float(exact[0, 3]) == pytest.approx(2.0, abs=1e-12)
    assert float(exact[0].max()) == float(exact[0, 3])
    sketched = attribute(obj, model, train, keys, query, ["gen-0"], cfg)
    assert top_k(sketched, keys, 2)[0][0][0] == "t3"
    per_sample = exact_attribution(
        obj, model, train, keys, query, ["gen-0"], cfg.model_copy(update={"noise": "per_sample"})
    )
    assert float(per_sample[0, 3]) < 2.0 - 1e-3  # different ε for the query: not the paper's


def test_top_k_orders_scores_and_breaks_ties_by_position():
    scores = torch.tensor([[0.1, 0.9, 0.9, -1.0], [2.0, 0.0, 1.0, 3.0]])
    res = top_k(scores, ["a", "b", "c", "d"], 3)
    assert [k for k, _ in res[0]] == ["b", "c", "a"]
    assert res[1] == [("d", 3.0), ("a", 2.0), ("c", 1.0)]


def test_band_schedules_are_refused():
    obj = DiffusionObjective(scheduler(), TimestepSchedule(band=(0, 1000)))
    with pytest.raises(ValueError, match="fixed timestep list"):
        sketch_gradients(obj, tiny_mlp(), images(1, (1, 3, 3)), ["a"], DMinConfig(**F64))


def test_non_finite_gradients_name_the_sample():
    model = tiny_mlp()
    with torch.no_grad():
        model.inp.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite dmin gradients"):
        sketch_gradients(objective(), model, images(2, (1, 3, 3)), ["a", "b"], DMinConfig(**F64))


def test_attribution_scores_checks_shapes():
    with pytest.raises(ValueError, match="same T, v"):
        attribution_scores(torch.zeros(1, 2, 8), torch.zeros(3, 1, 8))
