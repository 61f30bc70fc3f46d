import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import diffcurate.models.train as train_mod
from diffcurate.models.diffusion import DiffusionModel, load_diffusion_model
from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, latest_checkpoint, train
from tiny_unets import tiny_cond_unet


def digits(n: int) -> torch.Tensor:
    raw = load_digits().images[:n]
    return torch.from_numpy((np.round(raw * (255 / 16)) / 127.5 - 1).astype(np.float32))[:, None]


def weights(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CFG = TrainConfig(steps=40, batch_size=8, lr=3e-3, seed=5, log_every=0)


def test_loss_decreases_substantially():
    model = reference_model("tiny", seed=0)
    result = train(
        model, digits(16), TrainConfig(steps=150, batch_size=16, lr=3e-3), progress=False
    )
    assert len(result.losses) == 150 and result.final_step == 150
    first, last = np.mean(result.losses[:20]), np.mean(result.losses[-20:])
    # Measured over init/data seeds 0-2: last/first = 0.27-0.30.
    assert last < 0.5 * first, (first, last)
    assert not model.unet.training


def test_same_seed_same_weights_other_seed_differs():
    data = digits(16)
    runs = []
    for seed in (5, 5, 6):
        model = reference_model("tiny", seed=0)
        train(model, data, CFG.model_copy(update={"seed": seed}), progress=False)
        runs.append(weights(model))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    data = digits(12)  # 12 images, batch 8: batches straddle epoch boundaries
    straight = reference_model("tiny", seed=0)
    full = train(straight, data, CFG, progress=False)

    # Run 1 checkpoints every 15 steps and is killed during step 25.
    real_indices = train_mod._batch_indices

    def crash_at_25(n, batch_size, seed, step):
        if step == 25:
            raise KeyboardInterrupt
        return real_indices(n, batch_size, seed, step)

    crashed = reference_model("tiny", seed=0)
    cfg = CFG.model_copy(update={"checkpoint_every": 15})
    monkeypatch.setattr(train_mod, "_batch_indices", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(train_mod, "_batch_indices", real_indices)
    assert latest_checkpoint(tmp_path / "ck").name == "step-00000015"

    # Run 2 starts from a differently initialised model: the checkpoint must replace it.
    resumed = reference_model("tiny", seed=99)
    torch.manual_seed(12345)  # scrambles the global RNG; the checkpoint restores it
    result = train(resumed, data, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert result.start_step == 15 and result.final_step == 40
    assert same(weights(resumed), weights(straight))
    assert result.losses == full.losses
    # The final checkpoint is a loadable model equal to the trained one; 2 are kept.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000030", "step-00000040"]
    assert same(weights(load_diffusion_model(result.checkpoint)), weights(straight))

    # Running again with the same config finds the work done and changes nothing.
    again = train(resumed, data, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    assert again.start_step == again.final_step == 40 and same(weights(resumed), weights(straight))


def test_resume_refuses_changed_settings_or_data(tmp_path):
    data = digits(12)
    cfg = CFG.model_copy(update={"steps": 5})
    train(reference_model("tiny"), data, cfg, checkpoint_dir=tmp_path / "ck", progress=False)
    longer = cfg.model_copy(update={"steps": 10, "lr": 1e-2})
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.003 -> 0.01\)"):
        train(reference_model("tiny"), data, longer, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ValueError, match="different images"):
        train(
            reference_model("tiny"),
            digits(13),
            cfg.model_copy(update={"steps": 10}),
            checkpoint_dir=tmp_path / "ck",
        )


def test_nan_loss_and_bad_inputs_raise():
    data = digits(4)
    data[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0"):
        train(reference_model("tiny"), data, CFG, progress=False)
    with pytest.raises(ValueError, match=r"model expects"):
        train(reference_model("tiny"), torch.zeros(4, 3, 8, 8), CFG)
    with pytest.raises(ValueError, match="takes no conditioning"):
        train(reference_model("tiny"), digits(4), CFG, conditioning=torch.zeros(4, 2, 6))


def test_conditional_model_trains_deterministically():
    data, cond = digits(8), torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(0))
    cfg = CFG.model_copy(update={"steps": 10})
    runs = []
    for _ in range(2):
        unet = tiny_cond_unet(seed=1).float()
        model = DiffusionModel(unet=unet, scheduler=reference_model("tiny").scheduler)
        init = weights(model)
        result = train(model, data, cfg, conditioning=cond, progress=False)
        assert not same(init, weights(model)) and np.isfinite(result.losses).all()
        runs.append(weights(model))
    assert same(runs[0], runs[1])
    with pytest.raises(ValueError, match="needs conditioning"):
        train(model, data, cfg)


def test_float64_model_trains_in_float64_close_to_float32():
    data = digits(8)
    cfg = CFG.model_copy(update={"steps": 5})
    m32, m64 = reference_model("tiny", seed=0), reference_model("tiny", seed=0)
    m64.unet.double()
    r32 = train(m32, data, cfg, progress=False)
    r64 = train(m64, data, cfg, progress=False)
    assert all(p.dtype == torch.float64 for p in m64.unet.parameters())
    np.testing.assert_allclose(r64.losses, r32.losses, rtol=1e-4)
    w32, w64 = weights(m32), weights(m64)
    # Adam moves each weight by up to ~lr per step (5 x 3e-3 here); precision changes 1e-4 of it.
    assert max((w64[k] - w32[k].double()).abs().max().item() for k in w32) < 1e-3


def _cond_model(seed: int = 0) -> DiffusionModel:
    from tiny_unets import scheduler

    return DiffusionModel(unet=tiny_cond_unet(seed).float(), scheduler=scheduler())


def _captions(n: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, 6), generator=gen)


def test_caption_dropout_replaces_captions_by_the_empty_one_on_keyed_rows():
    x, cond = digits(8), _captions(8)
    config = CFG.model_copy(update={"steps": 6, "caption_dropout": 0.5})
    # When the empty caption equals every caption, dropping is a no-op: bit-identical weights.
    same_caption = cond[:1].expand(8, -1, -1).contiguous()
    a, b = _cond_model(), _cond_model()
    train(a, x, config, progress=False, conditioning=same_caption, unconditional=cond[:1])
    train(b, x, config.model_copy(update={"caption_dropout": 0.0}), progress=False,
          conditioning=same_caption)  # fmt: skip
    assert same(weights(a), weights(b))
    # With real captions, dropout changes the trajectory, deterministically.
    c, d, e = _cond_model(), _cond_model(), _cond_model()
    uncond = torch.zeros(1, 3, 6)
    train(c, x, config, progress=False, conditioning=cond, unconditional=uncond)
    train(d, x, config, progress=False, conditioning=cond, unconditional=uncond)
    train(e, x, config.model_copy(update={"caption_dropout": 0.0}), progress=False,
          conditioning=cond)  # fmt: skip
    assert same(weights(c), weights(d)) and not same(weights(c), weights(e))
    with pytest.raises(ValueError, match="unconditional"):
        train(_cond_model(), x, config, progress=False, conditioning=cond)


def test_a_latent_model_trains_its_unet_on_latents_and_leaves_the_vae_alone():
    from diffcurate.models.inputs import encode_pixels
    from tiny_unets import scheduler, tiny_vae

    vae = tiny_vae(seed=1).float()
    unet = reference_model("tiny", seed=0).unet
    unet.register_to_config(sample_size=4)
    model = DiffusionModel(unet=type(unet).from_config(unet.config), scheduler=scheduler(),
                           vae=vae)  # fmt: skip
    before_vae = {k: v.clone() for k, v in vae.state_dict().items()}
    before_unet = weights(model)
    latents = encode_pixels(model, digits(8))
    assert latents.shape == (8, 1, 4, 4)
    with pytest.raises(ValueError, match="latents have shape"):
        train(model, digits(8), CFG, progress=False)  # pixels where latents belong
    train(model, latents, CFG.model_copy(update={"steps": 3}), progress=False)
    assert not same(weights(model), before_unet)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before_vae.items())
