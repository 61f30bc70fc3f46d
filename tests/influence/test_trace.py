"""Per-sample curvature trace, checked against dense Jacobians/Hessians on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.trace import TraceConfig, layer_groups, trace_scores
from tiny_unets import (
    TinyDenoiser,
    captions,
    images,
    scheduler,
    tiny_cond_unet,
    tiny_mlp,
    tiny_unet,
    tiny_vae,
)

F64 = {"dtype": "float64"}


def owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "<root>"


def noisy_items(obj: DiffusionObjective, x0: torch.Tensor, keys: list):
    """(i, j, t[1], x_t[1,...], target[1,...]) per draw, by the closed-form forward process."""
    d = obj.draws(keys, x0.shape[1:], dtype=torch.float64)
    ab = obj.scheduler.alphas_cumprod.double()
    for i in range(len(keys)):
        for j in range(d.t.shape[1]):
            t = d.t[i, j : j + 1]
            eps = d.eps[i, j][None]
            x_t = ab[t].sqrt() * x0[i : i + 1] + (1 - ab[t]).sqrt() * eps
            yield i, j, t, x_t, eps


def reference_ggn(model, obj, x0, keys, cond=None) -> tuple[list[str], np.ndarray]:
    """(2/D)‖J_ℓ‖_F² per (sample, draw, layer) from autograd's dense Jacobian: [n, K, L]."""
    names = [n for n, _ in model.named_parameters()]
    layers = list(dict.fromkeys(owner(n) for n in names))
    params = tuple(p.detach() for p in model.parameters())
    out = np.zeros((len(keys), obj.schedule.n_draws, len(layers)))
    for i, j, t, x_t, _ in noisy_items(obj, x0, keys):
        kwargs = {} if cond is None else {"encoder_hidden_states": cond[i : i + 1]}

        def f(*ps, x_t=x_t, t=t, kwargs=kwargs):
            res = functional_call(model, dict(zip(names, ps, strict=True)), (x_t, t), kwargs)
            return res.sample.reshape(-1)

        jac = jacobian(f, params)
        dim = x_t.numel()
        for name, jp in zip(names, jac, strict=True):
            out[i, j, layers.index(owner(name))] += 2.0 / dim * jp.square().sum().item()
    return layers, out


def reference_hessian(model, obj, x0, keys) -> tuple[list[str], np.ndarray]:
    """Diagonal-block traces of the dense per-draw loss Hessian (autograd): [n, K, L]."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    layers = list(dict.fromkeys(owner(n) for n in names))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out = np.zeros((len(keys), obj.schedule.n_draws, len(layers)))
    for i, j, t, x_t, eps in noisy_items(obj, x0, keys):

        def loss(v, x_t=x_t, t=t, eps=eps):
            ps = {n: b.reshape(s) for n, b, s in zip(names, v.split(sizes), shapes, strict=True)}
            return F.mse_loss(functional_call(model, ps, (x_t, t)).sample, eps)

        diag = torch.diagonal(hessian(loss, flat))
        for name, block in zip(names, diag.split(sizes), strict=True):
            out[i, j, layers.index(owner(name))] += block.sum().item()
    return layers, out


def fixed_objective(timesteps=(20, 300), draws=1, prediction="epsilon") -> DiffusionObjective:
    sched = TimestepSchedule(timesteps=timesteps, draws_per_sample=draws)
    return DiffusionObjective(scheduler(prediction), sched, seed=3)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def mlp():
    return tiny_mlp()


def test_layer_groups_by_owning_module():
    names, groups = layer_groups(["a.w", "a.b", "b.c.w", "top"])
    assert names == ("a", "b.c", "<root>")
    assert groups == [["a.w", "a.b"], ["b.c.w"], ["top"]]


@pytest.mark.parametrize("which", ["mlp", "unet"])
def test_exact_ggn_matches_dense_jacobian(which, mlp, unet):
    model, shape = (mlp, (1, 3, 3)) if which == "mlp" else (unet, (1, 8, 8))
    obj = fixed_objective(prediction="v_prediction")  # the GGN does not depend on the target
    x0, keys = images(2, shape), ["s0", "s1"]
    layers, ref = reference_ggn(model, obj, x0, keys)
    res = trace_scores(obj, model, x0, keys, TraceConfig(exact=True, **F64))
    assert res.method == "ggn/exact/vmap"
    assert list(res.layer_names) == layers
    np.testing.assert_allclose(res.per_layer, ref.mean(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.score, ref.sum(-1).mean(1), rtol=1e-10)
    np.testing.assert_allclose(res.per_timestep, ref.sum(-1), rtol=1e-10)


def test_exact_ggn_conditional_unet_matches_dense_jacobian():
    model = tiny_cond_unet()
    obj = fixed_objective(timesteps=(20,))
    x0, cond, keys = images(2, (1, 8, 8)), captions(2), [0, 1]
    _, ref = reference_ggn(model, obj, x0, keys, cond=cond)
    res = trace_scores(obj, model, x0, keys, TraceConfig(exact=True, **F64), cond=cond)
    np.testing.assert_allclose(res.per_layer, ref.mean(axis=1), rtol=1e-10, atol=1e-12)
    other = trace_scores(obj, model, x0, keys, TraceConfig(exact=True, **F64), cond=cond.flip(0))
    assert not np.allclose(other.score, res.score)  # the captions enter the curvature


@pytest.mark.parametrize(("which", "probes"), [("mlp", 16384), ("unet", 2048)])
def test_hutchinson_ggn_within_2_percent_of_exact(which, probes, mlp, unet):
    model, shape = (mlp, (1, 3, 3)) if which == "mlp" else (unet, (1, 8, 8))
    obj = fixed_objective(timesteps=(20,))
    x0, keys = images(3, shape), ["a", "b", "c"]
    exact = trace_scores(obj, model, x0, keys, TraceConfig(exact=True, **F64))
    cfg = TraceConfig(probes=probes, probe_chunk=512, **F64)
    est = trace_scores(obj, model, x0, keys, cfg)
    rel = np.abs(est.score / exact.score - 1)
    print(f"{which}: |Hutchinson/exact - 1| = {rel}, stderr/exact = {est.stderr / exact.score}")
    assert (rel < 0.02).all()
    assert (np.abs(est.score - exact.score) < 4 * est.stderr).all()
    np.testing.assert_allclose(est.per_layer.sum(1), exact.per_layer.sum(1), rtol=0.02)


def test_hutchinson_ggn_is_unbiased_over_seeds(unet):
    obj = fixed_objective(timesteps=(20,))
    x0, keys = images(2, (1, 8, 8)), ["a", "b"]
    exact = trace_scores(obj, unet, x0, keys, TraceConfig(exact=True, **F64)).score
    runs = np.stack(
        [
            trace_scores(obj, unet, x0, keys, TraceConfig(probes=4, seed=s, **F64)).score
            for s in range(24)
        ]
    )
    mean, se = runs.mean(0), runs.std(0, ddof=1) / np.sqrt(len(runs))
    print(f"seed-mean/exact - 1 = {mean / exact - 1}, z = {(mean - exact) / se}")
    assert (se > 0).all()  # the seeds really give different estimates
    assert (np.abs(mean - exact) < 3.5 * se).all()


@pytest.mark.parametrize(
    "cfg",
    [
        TraceConfig(probes=8, **F64),
        TraceConfig(exact=True, **F64),
        TraceConfig(mode="hessian", probes=8, **F64),
        TraceConfig(mode="hessian", exact=True, **F64),
    ],
    ids=["ggn", "ggn-exact", "hessian", "hessian-exact"],
)
def test_per_layer_parts_sum_to_total(cfg, mlp):
    obj = fixed_objective(draws=2)
    res = trace_scores(obj, mlp, images(3, (1, 3, 3)), [1, 2, 3], cfg)
    assert res.per_layer.shape == (3, 3)  # inp, mid, out
    np.testing.assert_allclose(res.per_layer.sum(1), res.score, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.per_timestep.mean(1), res.score, rtol=1e-12, atol=1e-12)


def test_unet_per_layer_parts_sum_to_total(unet):
    obj = fixed_objective()
    res = trace_scores(obj, unet, images(2, (1, 8, 8)), [1, 2], TraceConfig(probes=4, **F64))
    assert res.per_layer.shape == (2, len(res.layer_names)) and len(res.layer_names) > 30
    assert any("attentions" in n for n in res.layer_names)
    np.testing.assert_allclose(res.per_layer.sum(1), res.score, rtol=1e-12)


def test_exact_hessian_matches_autograd_hessian(mlp):
    obj = fixed_objective(draws=2)
    x0, keys = images(3, (1, 3, 3)), ["p", "q", "r"]
    layers, ref = reference_hessian(mlp, obj, x0, keys)
    res = trace_scores(obj, mlp, x0, keys, TraceConfig(mode="hessian", exact=True, **F64))
    assert list(res.layer_names) == layers
    np.testing.assert_allclose(res.per_layer, ref.mean(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.score, ref.sum(-1).mean(1), rtol=1e-10)
    # The residual term makes the Hessian differ from the GGN on this tanh network.
    ggn = trace_scores(obj, mlp, x0, keys, TraceConfig(exact=True, **F64))
    assert np.abs(ggn.score - res.score).max() > 1e-3 * np.abs(res.score).max()


def test_hutchinson_hessian_converges_to_exact(mlp):
    obj = fixed_objective(timesteps=(20,))
    x0, keys = images(2, (1, 3, 3)), ["p", "q"]
    exact = trace_scores(obj, mlp, x0, keys, TraceConfig(mode="hessian", exact=True, **F64))
    cfg = TraceConfig(mode="hessian", probes=8192, probe_chunk=1024, **F64)
    est = trace_scores(obj, mlp, x0, keys, cfg)
    print(f"hessian: Hutchinson/exact - 1 = {est.score / exact.score - 1}")
    assert (np.abs(est.score - exact.score) < 4 * est.stderr).all()
    np.testing.assert_allclose(est.score, exact.score, rtol=0.05)


@pytest.mark.parametrize("mode", ["ggn", "hessian"])
def test_scores_invariant_to_batch_size_and_shards(mode, unet):
    obj = DiffusionObjective(scheduler(), TimestepSchedule(band=(10, 200), draws_per_sample=2))
    keys = ["k0", "k1", "k2", "k3", "k4"]
    x0 = images(5, (1, 8, 8))
    cfg = TraceConfig(mode=mode, probes=3, item_chunk=10, **F64)
    full = trace_scores(obj, unet, x0, keys, cfg)
    small = cfg.model_copy(update={"item_chunk": 3})
    shards = [
        trace_scores(obj, unet, x0[[3, 1]], ["k3", "k1"], small),
        trace_scores(obj, unet, x0[[0, 2, 4]], ["k0", "k2", "k4"], small),
        trace_scores(obj, unet, x0[2:3], ["k2"], small),
    ]
    order = {"k3": 3, "k1": 1, "k0": 0, "k2": 2, "k4": 4}
    for shard in shards:
        idx = [order[k] for k in shard.sample_keys]
        np.testing.assert_allclose(shard.score, full.score[idx], rtol=1e-12, atol=0)
        np.testing.assert_allclose(shard.per_layer, full.per_layer[idx], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(shard.stderr, full.stderr[idx], rtol=1e-10, atol=0)


class NoVmapDenoiser(TinyDenoiser):
    """Calls ``.item()`` in forward, which ``vmap`` cannot batch (forces the loop fallback)."""

    def forward(self, sample, timestep, encoder_hidden_states=None):
        if sample.abs().max().item() > 1e6:
            raise ValueError("unreachable")
        return super().forward(sample, timestep, encoder_hidden_states)


def test_loop_fallback_matches_vmap(mlp, unet):
    obj = fixed_objective()
    x0 = images(2, (1, 8, 8))
    cfg = TraceConfig(probes=4, **F64)
    vec = trace_scores(obj, unet, x0, [0, 1], cfg)
    loop = trace_scores(obj, unet, x0, [0, 1], cfg.model_copy(update={"vectorize": False}))
    assert vec.method.endswith("vmap") and loop.method.endswith("loop")
    np.testing.assert_allclose(loop.per_layer, vec.per_layer, rtol=1e-10, atol=1e-14)
    # A module vmap cannot batch falls back automatically, with the same numbers.
    hostile = NoVmapDenoiser().double()
    hostile.load_state_dict(mlp.state_dict())
    xm = images(2, (1, 3, 3))
    auto = trace_scores(obj, hostile, xm, [0, 1], TraceConfig(mode="hessian", probes=4, **F64))
    ref = trace_scores(obj, mlp, xm, [0, 1], TraceConfig(mode="hessian", probes=4, **F64))
    assert auto.method == "hessian/hutchinson/loop"
    np.testing.assert_allclose(auto.score, ref.score, rtol=1e-10)


def test_float32_scoring_leaves_float64_model_untouched(unet):
    obj = fixed_objective(timesteps=(20,))
    x0 = images(2, (1, 8, 8))
    f64 = trace_scores(obj, unet, x0, [0, 1], TraceConfig(exact=True, **F64))
    f32 = trace_scores(obj, unet, x0, [0, 1], TraceConfig(exact=True, dtype="float32"))
    assert next(unet.parameters()).dtype == torch.float64
    np.testing.assert_allclose(f32.score, f64.score, rtol=1e-4)


def test_latent_mode_equals_scoring_preencoded_latents():
    vae, model = tiny_vae(), tiny_mlp(size=4)
    sched = TimestepSchedule(timesteps=(20, 100))
    latent_obj = DiffusionObjective(scheduler(), sched, seed=1, vae=vae)
    plain_obj = DiffusionObjective(scheduler(), sched, seed=1)
    x = images(2, (1, 8, 8))
    cfg = TraceConfig(exact=True, **F64)
    via_vae = trace_scores(latent_obj, model, x, ["a", "b"], cfg)
    direct = trace_scores(plain_obj, model, latent_obj.encode(x), ["a", "b"], cfg)
    np.testing.assert_allclose(via_vae.per_layer, direct.per_layer, rtol=1e-12)


def test_frozen_parameters_are_not_scored():
    model = tiny_mlp()
    model.mid.requires_grad_(False)
    obj = fixed_objective()
    x0 = images(2, (1, 3, 3))
    res = trace_scores(obj, model, x0, [0, 1], TraceConfig(exact=True, **F64))
    assert res.layer_names == ("inp", "out")
    full = trace_scores(obj, tiny_mlp(), x0, [0, 1], TraceConfig(exact=True, **F64))
    np.testing.assert_allclose(res.per_layer, full.per_layer[:, [0, 2]], rtol=1e-12)
