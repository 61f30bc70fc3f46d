"""Training the reference pipeline's VAE: deterministic, effective, unit-variance latents."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from pydantic import ValidationError

from diffcurate.demo.photos import crop_geometry, render
from diffcurate.models.vae_train import (
    VAEConfig,
    posterior_means,
    reconstruction_rmse,
    train_vae,
)

SIZE = 8


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """43,711 parameters: the block types of sd-tiny's VAE at 8/16 channels (factor 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """12 real photo crops at 8×8, in [-1, 1]."""
    crops = [
        c for c in (crop_geometry(i, SIZE, 0) for i in range(40)) if c.out_size == (SIZE, SIZE)
    ][:12]
    pixels = np.stack([render(c) for c in crops]).transpose(0, 3, 1, 2)
    return torch.from_numpy(pixels).float() / 127.5 - 1


@pytest.fixture(scope="module")
def trained(photos):
    vae = tiny_vae()
    before = reconstruction_rmse(vae, photos)
    result = train_vae(vae, photos, VAEConfig(steps=80, batch_size=6, lr=1e-2))
    return vae, before, result


def test_training_reconstructs_far_better(trained, photos):
    vae, before, result = trained
    # Measured: 0.518 before, 0.231 after 80 steps.
    assert before > 0.45 and result.recon_rmse < 0.26
    assert result.recon_rmse == reconstruction_rmse(vae, photos)
    assert len(result.losses) == 80
    assert np.mean(result.losses[-10:]) < 0.4 * np.mean(result.losses[:10])
    # Frozen afterwards: further training would invalidate the latent scale.
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_scaling_factor_gives_unit_variance_latents(trained, photos, tmp_path):
    vae, _, result = trained
    assert vae.config.scaling_factor == result.scaling_factor
    vae.save_pretrained(tmp_path / "vae")  # the saved config carries it
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.scaling_factor == (
        result.scaling_factor
    )
    means = posterior_means(vae, photos)
    assert means.shape == (12, 4, SIZE // 2, SIZE // 2)
    assert float((means.double() * vae.config.scaling_factor).std()) == pytest.approx(1, abs=1e-6)
    # Batching does not change the latents beyond float32 rounding.
    torch.testing.assert_close(posterior_means(vae, photos, batch_size=5), means)


def test_reconstruction_rmse_is_the_root_mean_square_of_the_round_trip(trained, photos):
    vae = trained[0]
    with torch.no_grad():
        recon = vae.decode(vae.encode(photos).latent_dist.mean).sample
    want = float(((recon.double() - photos.double()) ** 2).mean().sqrt())
    assert reconstruction_rmse(vae, photos, batch_size=5) == pytest.approx(want, rel=1e-6)


def test_two_runs_are_bit_identical_and_the_seed_matters(photos):
    config = VAEConfig(steps=6, batch_size=5, lr=1e-2)
    a, b, c = tiny_vae(), tiny_vae(), tiny_vae()
    ra, rb = train_vae(a, photos, config), train_vae(b, photos, config)
    rc = train_vae(c, photos, config.model_copy(update={"seed": 1}))
    assert ra.losses == rb.losses and ra.scaling_factor == rb.scaling_factor
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert rc.losses != ra.losses


def test_refuses_bad_inputs_and_config(photos):
    with pytest.raises(ValueError, match="expects"):
        train_vae(tiny_vae(), photos[:, :1], VAEConfig(steps=1))
    assert (VAEConfig().steps, VAEConfig().kl_weight) == (1500, 1e-6)
    with pytest.raises(ValidationError):
        VAEConfig(steps=0)
    with pytest.raises(ValidationError):
        VAEConfig(steps=1).steps = 2  # type: ignore[misc]
