"""The surgical fine-tune is continued training on the kept samples, bit for bit."""

import pytest
import torch

from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, train


def _images(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


@pytest.mark.parametrize("warmup", [0, 4])
def test_finetune_equals_continued_training_on_the_pruned_set(warmup):
    model = reference_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = MitigationConfig(method="finetune", epochs=2, lr=1e-4, batch_size=8, seed=3,
                           warmup_steps=warmup)  # fmt: skip
    assert cfg.steps_for(20) == 6  # 2 epochs x ceil(20 / 8)
    candidate, result = mitigate(model, _images(), cfg)
    assert len(result.losses) == 6 and result.sample_passes == 6 * 8
    assert result.trainable is None
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    twin = reference_model("tiny", seed=0)
    train(twin, _images(), TrainConfig(steps=6, batch_size=8, lr=1e-4, seed=3, log_every=0,
                                       warmup_steps=warmup), progress=False)  # fmt: skip
    for a, b in zip(candidate.unet.parameters(), twin.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_steps_override_epochs_and_epochs_alone_count_passes():
    cfg = MitigationConfig(method="finetune", steps=7, epochs=3, batch_size=8)
    assert cfg.steps_for(1000) == 7
    assert MitigationConfig().steps_for(1000) == MitigationConfig().steps  # measured default
    passes = MitigationConfig(epochs=3, batch_size=8)
    assert passes.steps is None and passes.steps_for(20) == 9
    # The choice survives a JSON round trip (ledger, deployments).
    assert MitigationConfig.model_validate_json(passes.model_dump_json()).steps_for(20) == 9


def _conditional(seed=0):
    from tiny_unets import captions, scheduler, tiny_cond_unet

    model = DiffusionModel(unet=tiny_cond_unet(seed).float(), scheduler=scheduler())
    x0 = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, x0, captions(12).float(), torch.zeros(1, 3, 6)


def test_conditional_finetune_equals_training_with_caption_dropout():
    model, x0, cond, uncond = _conditional()
    cfg = MitigationConfig(method="finetune", steps=5, lr=1e-3, batch_size=4, seed=2,
                           caption_dropout=0.5, warmup_steps=0)  # fmt: skip
    candidate, _ = mitigate(model, x0, cfg, conditioning=cond, unconditional=uncond)
    twin, *_ = _conditional()
    train(twin, x0, TrainConfig(steps=5, batch_size=4, lr=1e-3, seed=2, log_every=0,
                                caption_dropout=0.5),
          progress=False, conditioning=cond, unconditional=uncond)  # fmt: skip
    for a, b in zip(candidate.unet.parameters(), twin.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_caption_side_settings_change_the_conditional_fine_tune():
    model, x0, cond, _ = _conditional()
    base = dict(method="finetune", steps=5, lr=1e-3, batch_size=4, seed=2, caption_dropout=0.0)
    plain, _ = mitigate(model, x0, MitigationConfig(**base), conditioning=cond)
    for extra in ({"caption_noise": 0.5}, {"caption_replace": 0.5}):
        perturbed, _ = mitigate(model, x0, MitigationConfig(**base, **extra), conditioning=cond)
        pairs = zip(plain.unet.parameters(), perturbed.unet.parameters(), strict=True)
        assert any(not torch.equal(a, b) for a, b in pairs)


def test_conditional_model_refuses_missing_captions():
    model, x0, *_ = _conditional()
    with pytest.raises(ValueError, match="needs caption states"):
        mitigate(model, x0, MitigationConfig(method="finetune", steps=1, caption_dropout=0.0))
