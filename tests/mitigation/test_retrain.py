"""Retraining starts from a fresh initialisation and never touches the input model."""

import torch

from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.models.reference import reference_model


def _images(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_retrain_starts_from_a_fresh_initialisation():
    model = reference_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = MitigationConfig(method="retrain", retrain_steps=2, batch_size=8, seed=5)
    candidate, result = mitigate(model, _images(), cfg)
    assert len(result.losses) == 2
    assert result.sample_passes == 2 * 8
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
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
    assert d_fresh < d_orig
