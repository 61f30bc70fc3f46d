"""Mitigation: surgical fine-tune and retraining never touch the input model."""

import torch

from diffcurate.models.mitigate import MitigationConfig, mitigate
from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, train


def _images(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_finetune_equals_continued_training_on_the_pruned_set():
    model = reference_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = MitigationConfig(method="finetune", epochs=2, lr=1e-4, batch_size=8, seed=3)
    assert cfg.steps_for(20) == 6  # 2 epochs x ceil(20 / 8)
    candidate, result = mitigate(model, _images(), cfg)
    assert len(result.losses) == 6
    # Input model unchanged.
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    # Same as training a copy directly with the same settings.
    twin = reference_model("tiny", seed=0)
    train(twin, _images(), TrainConfig(steps=6, batch_size=8, lr=1e-4, seed=3, log_every=0),
          progress=False)  # fmt: skip
    for a, b in zip(candidate.unet.parameters(), twin.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_retrain_starts_from_a_fresh_initialisation():
    model = reference_model("tiny", seed=0)
    cfg = MitigationConfig(method="retrain", retrain_steps=2, batch_size=8, seed=5)
    candidate, result = mitigate(model, _images(), cfg)
    assert len(result.losses) == 2
    assert type(candidate.unet) is type(model.unet)
    assert candidate.unet.config == model.unet.config
    fresh = reference_model("tiny", seed=5)
    # Fresh weights + 2 steps: far from the original weights, close to a seed-5 init.
    d_orig = sum(
        (a - b).abs().sum()
        for a, b in zip(candidate.unet.parameters(), model.unet.parameters(), strict=True)
    )
    d_fresh = sum(
        (a - b).abs().sum()
        for a, b in zip(candidate.unet.parameters(), fresh.unet.parameters(), strict=True)
    )
    assert d_fresh < d_orig  # fmt: skip
