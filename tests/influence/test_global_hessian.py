"""Global-Hessian thresholding: batch Hessian traces against dense autograd Hessians.

Reference: for a minibatch B with mean loss L_B(θ) = (1/|B|) Σ_{i∈B} (1/K) Σ_j mean_D (f − y)²,
``torch.autograd.functional.hessian`` of L_B over the flattened parameters gives the dense d × d
Hessian; its trace times |B| is the batch's contribution c_B, and its diagonal summed over a
layer's parameters is that layer's part.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian
from torch.func import functional_call

from diffcurate.influence.global_hessian import (
    BatchTraces,
    GlobalHessianConfig,
    batch_hessian_traces,
    batch_order,
    global_hessian_risk,
    greedy_batch_removal,
)
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from tiny_unets import images, scheduler, tiny_mlp, tiny_unet

F64 = {"dtype": "float64"}


def objective(timesteps=(20, 300)) -> DiffusionObjective:
    return DiffusionObjective(scheduler(), TimestepSchedule(timesteps=timesteps), seed=0)


def dense_batch_hessian(obj, model, x, keys, members) -> np.ndarray:
    """Dense Hessian [d, d] of the mean loss of ``members`` (keys), by autograd."""
    rows = [keys.index(m) for m in members]
    batch = obj.prepare(x[rows], [keys[r] for r in rows], torch.float64, torch.device("cpu"))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params = {n: c.reshape(s) for n, c, s in zip(names, flat.split(sizes), shapes, strict=True)}
        out = functional_call(model, params, (batch.x_t, batch.t)).sample
        return (out - batch.target).square().flatten(1).mean(dim=1).mean()

    return hessian(loss, theta).numpy()


@pytest.fixture(scope="module")
def setup():
    obj = objective()
    model = tiny_mlp()
    x = images(7, (1, 3, 3), seed=2)
    keys = [f"k{i}" for i in range(7)]
    return obj, model, x, keys


def test_exact_batch_traces_equal_dense_hessian_traces(setup):
    obj, model, x, keys = setup
    cfg = GlobalHessianConfig(batch_size=3, exact=True, batch_items=4, **F64)
    res = batch_hessian_traces(obj, model, x, keys, cfg)
    assert [len(b) for b in res.batches] == [3, 3, 1]
    assert sorted(k for b in res.batches for k in b) == sorted(keys)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    owners = [n.rsplit(".", 1)[0] for n in names]
    assert res.layer_names == tuple(dict.fromkeys(owners))
    total = 0.0
    for b, members in enumerate(res.batches):
        h = dense_batch_hessian(obj, model, x, keys, members)
        diag = np.split(np.diag(h), np.cumsum(sizes)[:-1])
        per_layer = np.zeros(len(res.layer_names))
        for owner, part in zip(owners, diag, strict=True):
            per_layer[res.layer_names.index(owner)] += part.sum()
        c = len(members) * np.trace(h)
        np.testing.assert_allclose(res.contribution[b], c, rtol=1e-10)
        np.testing.assert_allclose(
            res.per_layer[b], len(members) * per_layer, rtol=1e-9, atol=1e-12
        )
        total += c
    assert np.isnan(res.stderr).all()
    # The overall trace of the mean loss over the set is Σ_b c_b / n.
    full = dense_batch_hessian(obj, model, x, keys, keys)
    np.testing.assert_allclose(res.total_trace, np.trace(full), rtol=1e-10)
    np.testing.assert_allclose(total / len(keys), np.trace(full), rtol=1e-10)


def test_hutchinson_batch_traces_are_unbiased(setup):
    obj, model, x, keys = setup
    exact = batch_hessian_traces(
        obj, model, x, keys, GlobalHessianConfig(batch_size=3, exact=True, **F64)
    )
    est = batch_hessian_traces(
        obj, model, x, keys, GlobalHessianConfig(batch_size=3, probes=300, **F64)
    )
    assert est.batches == exact.batches
    z = np.abs(est.contribution - exact.contribution) / est.stderr
    assert z.max() < 5, z
    assert (est.stderr > 0).all()
    np.testing.assert_allclose(est.per_layer.sum(axis=1), est.contribution, rtol=1e-10)
    # Chunking the items changes nothing (the Hessian is additive over items).
    chunked = batch_hessian_traces(
        obj, model, x, keys, GlobalHessianConfig(batch_size=3, probes=300, batch_items=1, **F64)
    )
    np.testing.assert_allclose(chunked.contribution, est.contribution, rtol=1e-10)


def test_risk_gives_every_sample_its_batch_contribution_order_invariantly(setup):
    obj, model, x, keys = setup
    cfg = GlobalHessianConfig(batch_size=3, exact=True, **F64)
    res = global_hessian_risk(obj, model, x, keys, cfg)
    traces = batch_hessian_traces(obj, model, x, keys, cfg)
    for b, members in enumerate(traces.batches):
        for k in members:
            assert res.score[keys.index(k)] == traces.contribution[b]
    np.testing.assert_allclose(res.per_layer.sum(axis=1), res.score, rtol=1e-10)
    perm = [3, 0, 6, 1, 5, 2, 4]
    shuffled = global_hessian_risk(obj, model, x[perm], [keys[i] for i in perm], cfg)
    np.testing.assert_allclose(shuffled.score, res.score[perm], rtol=1e-10)
    assert batch_order(keys, 0) != batch_order(keys, 1)  # the seed picks the partition
    assert res.method == "global-hessian/batch3/exact"


def test_greedy_removal_takes_whole_batches_by_contribution():
    a = BatchTraces(
        batches=(("a1", "a2"), ("b1", "b2", "b3")),
        contribution=np.array([1.0, 5.0]),
        stderr=np.full(2, np.nan),
        per_layer=np.zeros((2, 1)),
        layer_names=("l",),
    )
    b = BatchTraces(
        batches=(("c2", "c1"),),
        contribution=np.array([3.0]),
        stderr=np.full(1, np.nan),
        per_layer=np.zeros((1, 1)),
        layer_names=("l",),
    )
    assert greedy_batch_removal([a, b], 0) == []
    assert greedy_batch_removal([a, b], 3) == ["b1", "b2", "b3"]
    assert greedy_batch_removal([a, b], 4) == ["b1", "b2", "b3", "c1"]
    assert greedy_batch_removal([a, b], 10) == ["b1", "b2", "b3", "c1", "c2", "a1", "a2"]


def test_runs_on_a_diffusers_unet():
    obj = objective(timesteps=(20,))
    model = tiny_unet()
    x = images(4, (1, 8, 8), seed=3)
    res = global_hessian_risk(
        obj, model, x, list(range(4)), GlobalHessianConfig(batch_size=2, probes=2, **F64)
    )
    assert np.isfinite(res.score).all() and len(set(res.score.tolist())) == 2
    assert all(p.grad is None for p in model.parameters())
