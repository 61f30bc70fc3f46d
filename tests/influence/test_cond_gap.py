"""The cond-gap signal (Wen et al.) against a hand-written computation of its definition."""

import numpy as np
import pytest
import torch

from diffcurate.influence.cond_gap import CondGapConfig, cond_gap_scores, initial_noise
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.registry import ScorerSpec, score_function
from tiny_unets import captions, images, scheduler, tiny_cond_unet, tiny_unet

SHAPE = (1, 8, 8)
KEYS = ["s0", "s1", "s2"]


def _objective(prediction_type: str = "epsilon", seed: int = 3) -> DiffusionObjective:
    return DiffusionObjective(
        scheduler(prediction_type), TimestepSchedule(timesteps=(0,)), seed=seed
    )


def _eps(obj, out, x, t):
    """ε implied by a network output, written out from the v-prediction definition."""
    if obj.prediction_type == "epsilon":
        return out
    ab = obj.scheduler.alphas_cumprod.double()[t]
    return ab.sqrt() * out + (1 - ab).sqrt() * x


def _by_hand(obj, model, cond, uncond, cfg):
    """Wen et al.'s d = mean_g mean_{s<S} ||ε(x_s, c) − ε(x_s, ∅)||₂ with a hand DDIM step."""
    n_train = obj.scheduler.config.num_train_timesteps
    stride = n_train // cfg.inference_steps
    ts = list(range(0, n_train, stride))[::-1][: cfg.measure_steps]
    ab = obj.scheduler.alphas_cumprod.double()
    x_t = initial_noise(obj, KEYS, cfg.generations, SHAPE)
    out = np.zeros((len(KEYS), cfg.measure_steps, cfg.generations))
    for i in range(len(KEYS)):
        for g in range(cfg.generations):
            x = x_t[i, g][None]
            for s, t in enumerate(ts):
                tt = torch.tensor([t])
                ec = _eps(obj, model(x, tt, encoder_hidden_states=cond[i : i + 1]).sample, x, t)
                eu = _eps(obj, model(x, tt, encoder_hidden_states=uncond[None]).sample, x, t)
                out[i, s, g] = (ec - eu).norm().item()
                e = eu + cfg.guidance_scale * (ec - eu)
                prev = t - stride
                a_prev = ab[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
                x0 = ((x - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()).clamp(-1, 1)
                # DDIM (η=0): clipped x0 (DDPM configs default to clip_sample=True), direction
                # from the unclipped ε (diffusers' default use_clipped_model_output=False)
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_the_definition_over_several_steps(prediction_type):
    obj = _objective(prediction_type)
    model = tiny_cond_unet()
    cond, uncond = captions(3, seq=3, dim=6), captions(1, seq=3, dim=6, seed=9)[0]
    cfg = CondGapConfig(generations=2, inference_steps=10, measure_steps=3, dtype="float64")
    res = cond_gap_scores(obj, model, images(3, SHAPE), KEYS, cond, uncond, cfg)
    want = _by_hand(obj, model, cond, uncond, cfg)
    # first step: exact; later steps: diffusers' DDIM step keeps its ᾱ in float32 (≈1e-8 rel.)
    np.testing.assert_allclose(res.per_timestep[:, 0], want[:, 0].mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(res.per_timestep, want.mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(res.score, want.mean(axis=(1, 2)), rtol=1e-6)
    assert res.timesteps == (900, 800, 700)
    assert np.all(res.score > 0)


def test_zero_when_the_caption_is_the_empty_caption():
    obj = _objective()
    uncond = captions(1, seq=3, dim=6, seed=9)
    cfg = CondGapConfig(generations=2, inference_steps=10, measure_steps=2, dtype="float64")
    res = cond_gap_scores(
        obj, tiny_cond_unet(), images(3, SHAPE), KEYS, uncond.repeat(3, 1, 1), uncond, cfg
    )
    np.testing.assert_allclose(res.score, 0.0, atol=1e-12)


def test_scores_do_not_depend_on_the_batch():
    obj = _objective()
    model = tiny_cond_unet()
    cond, uncond = captions(3, seq=3, dim=6), captions(1, seq=3, dim=6, seed=9)
    cfg = CondGapConfig(generations=3, inference_steps=10, dtype="float64", batch_items=2)
    full = cond_gap_scores(obj, model, images(3, SHAPE), KEYS, cond, uncond, cfg)
    alone = cond_gap_scores(obj, model, images(1, SHAPE), KEYS[2:], cond[2:], uncond, cfg)
    np.testing.assert_allclose(full.score[2], alone.score[0], rtol=1e-12)
    assert np.all(np.isfinite(full.stderr))


def test_refuses_unconditional_use():
    obj = _objective()
    with pytest.raises(ValueError, match="text-conditional"):
        cond_gap_scores(obj, tiny_unet(), images(3, SHAPE), KEYS, None, None)


def test_registry_spec_measures_the_first_sampler_steps():
    spec = ScorerSpec(signal="cond-gap", generations=2, inference_steps=20, measure_steps=2,
                      dtype="float64")  # fmt: skip
    obj = spec.objective(scheduler())
    assert obj.schedule.timesteps == (950, 900)
    cond, uncond = captions(3, seq=3, dim=6), captions(1, seq=3, dim=6, seed=9)
    res = score_function(spec)(obj, tiny_cond_unet(), images(3, SHAPE), KEYS, cond, uncond)
    assert res.method == "cond-gap/ddim" and res.per_timestep.shape == (3, 2)
    with pytest.raises(ValueError, match="inference_steps"):
        ScorerSpec(signal="cond-gap", timesteps=(10,))
