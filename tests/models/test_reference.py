import pytest
import torch
from pydantic import ValidationError

from diffcurate.models.reference import (
    REFERENCE_ARCHITECTURES,
    SchedulerConfig,
    UNetArchitecture,
    reference_architecture,
    reference_model,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_digits_8px_matches_the_design_fact():
    model = reference_model("digits-8px")
    assert 500_000 <= n_params(model.unet) <= 1_000_000
    assert n_params(model.unet) == 701_345
    blocks = model.unet.config.down_block_types
    assert "AttnDownBlock2D" in blocks and "DownBlock2D" in blocks


@pytest.mark.parametrize("name", sorted(REFERENCE_ARCHITECTURES))
def test_forward_shape(name):
    model = reference_model(name)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = model.unet(x, torch.tensor([0, 1, 500, 998, 999])).sample
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.float32
    assert model.sample_shape == (1, 8, 8)


def test_tiny_is_tiny():
    assert 1_000 <= n_params(reference_model("tiny").unet) <= 20_000


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = reference_model("tiny", seed=7).unet.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = reference_model("tiny", seed=7).unet.state_dict()
    c = reference_model("tiny", seed=8).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_scheduler_defaults_are_ddpm_linear_epsilon():
    sched = SchedulerConfig().build()
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.prediction_type == "epsilon"
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(sched.betas, torch.linspace(1e-4, 0.02, 1000))


def test_configs_are_frozen_and_validated():
    arch = reference_architecture("tiny")
    with pytest.raises(ValidationError):
        arch.sample_size = 16  # type: ignore[misc]
    with pytest.raises(ValidationError, match="does not divide"):
        UNetArchitecture.model_validate(arch.model_dump() | {"norm_num_groups": 3})
    with pytest.raises(KeyError, match="known: digits-8px, tiny"):
        reference_architecture("huge")
