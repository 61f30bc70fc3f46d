"""Text encoders of text-to-image pipelines: local loading, round trip, clear errors."""

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from diffcurate.models.diffusion import (
    DiffusionModel,
    ModelLoadError,
    load_diffusion_model,
    save_diffusion_model,
)
from diffcurate.models.text_encoder import load_text_encoder
from tiny_unets import tiny_cond_unet, tiny_text_encoder

CAPTIONS = ["a handwritten digit 5", "zero", ""]


@pytest.fixture
def pipeline(tmp_path):
    encoder = tiny_text_encoder(tmp_path / "vocab", hidden=6)
    model = DiffusionModel(
        unet=tiny_cond_unet(cross_dim=6).float(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        text_encoder=encoder,
    )
    return model, save_diffusion_model(model, tmp_path / "pipe")


def test_round_trip_gives_identical_caption_embeddings(pipeline):
    model, path = pipeline
    loaded = load_diffusion_model(path)
    assert loaded.conditional and loaded.text_encoder is not None
    want = model.text_encoder.encode(CAPTIONS)
    got = loaded.text_encoder.encode(CAPTIONS, batch_size=2)
    assert got.shape == (3, 8, 6)
    assert torch.equal(got, want)
    # Different captions give different embeddings; padding makes every caption max_length long.
    assert not torch.allclose(got[0], got[1])


def test_embeddings_do_not_depend_on_the_batch(pipeline):
    model, _ = pipeline
    together = model.text_encoder.encode(CAPTIONS, batch_size=3)
    alone = model.text_encoder.encode(CAPTIONS[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)


def test_missing_tokenizer_is_a_clear_error(pipeline):
    _, path = pipeline
    shutil.rmtree(path / "tokenizer")
    with pytest.raises(ModelLoadError, match="no tokenizer/"):
        load_diffusion_model(path)


def test_unsupported_text_encoder_architecture(pipeline):
    _, path = pipeline
    cfg_path = path / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["T5EncoderModel"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'T5EncoderModel'"):
        load_text_encoder(path)


def test_width_mismatch_with_the_unet(tmp_path):
    model = DiffusionModel(
        unet=tiny_cond_unet(cross_dim=6).float(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        text_encoder=tiny_text_encoder(tmp_path / "vocab", hidden=8),
    )
    path = save_diffusion_model(model, tmp_path / "pipe")
    with pytest.raises(ModelLoadError, match=r"width 8 does not match .* cross_attention_dim 6"):
        load_diffusion_model(path)


def test_conditional_unet_without_text_encoder_still_loads(pipeline):
    _, path = pipeline
    shutil.rmtree(path / "text_encoder")
    shutil.rmtree(path / "tokenizer")
    loaded = load_diffusion_model(path)
    assert loaded.conditional and loaded.text_encoder is None
