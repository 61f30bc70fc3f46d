"""Per-sample loss signal: a direct recomputation of F.mse_loss on the same keyed draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffcurate.influence.loss_signal import LossSignalConfig, loss_scores, loss_values
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from tiny_unets import captions, images, scheduler, tiny_cond_unet, tiny_mlp, tiny_unet, tiny_vae

F64 = LossSignalConfig(dtype="float64", batch_items=3)
SHAPE = (1, 8, 8)


def direct_losses(model, obj, x0, keys, cond=None) -> np.ndarray:
    """F.mse_loss per (sample, draw), recomputed one draw at a time: [n, K]."""
    d = obj.draws(keys, x0.shape[1:], dtype=torch.float64)
    out = np.zeros(tuple(d.t.shape))
    for i in range(len(keys)):
        for j in range(d.t.shape[1]):
            t, eps = d.t[i, j : j + 1], d.eps[i, j][None]
            x_t = obj.scheduler.add_noise(x0[i : i + 1], eps, t)
            kwargs = {} if cond is None else {"encoder_hidden_states": cond[i : i + 1]}
            with torch.no_grad():
                pred = model(x_t, t, **kwargs).sample
            target = eps
            if obj.prediction_type == "v_prediction":
                target = obj.scheduler.get_velocity(x0[i : i + 1], eps, t)
            out[i, j] = F.mse_loss(pred, target).item()
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_signal_equals_direct_mse(prediction):
    model = tiny_unet()
    sched = TimestepSchedule(timesteps=(20, 100, 500), draws_per_sample=2)
    obj = DiffusionObjective(scheduler(prediction), sched, seed=11)
    x0, keys = images(3, SHAPE), ["a", "b", "c"]
    ref = direct_losses(model, obj, x0, keys)
    np.testing.assert_allclose(loss_values(obj, model, x0, keys, F64), ref, rtol=1e-12)
    res = loss_scores(obj, model, x0, keys, F64)
    assert res.method == "loss/negated"
    np.testing.assert_allclose(res.score, -ref.mean(1), rtol=1e-12)  # high = low loss = risky
    np.testing.assert_allclose(res.stderr, ref.std(1, ddof=1) / np.sqrt(6), rtol=1e-10)
    np.testing.assert_allclose(res.per_timestep, -ref.reshape(3, 3, 2).mean(2), rtol=1e-12)
    assert res.timesteps == (20, 100, 500)


def test_loss_signal_conditional_and_latent():
    model = tiny_cond_unet()
    obj = DiffusionObjective(scheduler(), TimestepSchedule(band=(0, 1000), draws_per_sample=4))
    x0, cond, keys = images(2, SHAPE), captions(2), [0, 1]
    ref = direct_losses(model, obj, x0, keys, cond=cond)
    res = loss_scores(obj, model, x0, keys, F64, cond=cond)
    np.testing.assert_allclose(res.score, -ref.mean(1), rtol=1e-12)
    assert res.per_timestep is None

    vae, mlp = tiny_vae(), tiny_mlp(size=4)
    latent = DiffusionObjective(scheduler(), TimestepSchedule(timesteps=(100,)), vae=vae)
    z = latent.encode(x0)
    res = loss_scores(latent, mlp, x0, keys, F64)
    np.testing.assert_allclose(res.score, -direct_losses(mlp, latent, z, keys).mean(1), rtol=1e-12)


def test_loss_signal_invariant_to_batch_and_shards():
    model = tiny_unet()
    obj = DiffusionObjective(scheduler(), TimestepSchedule(band=(0, 1000), draws_per_sample=3))
    x0, keys = images(5, SHAPE), [f"id{i}" for i in range(5)]
    full = loss_scores(obj, model, x0, keys, LossSignalConfig(dtype="float64", batch_items=64))
    shard = loss_scores(obj, model, x0[[4, 1]], ["id4", "id1"], F64)
    np.testing.assert_allclose(shard.score, full.score[[4, 1]], rtol=1e-12, atol=0)


def test_non_finite_loss_is_a_clear_error():
    model = tiny_unet()
    obj = DiffusionObjective(scheduler(), TimestepSchedule(timesteps=(10,)))
    x0 = images(2, SHAPE)
    x0[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="bad"):
        loss_scores(obj, model, x0, ["good", "bad"], F64)
