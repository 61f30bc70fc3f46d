"""The sd-tiny reference pipeline and its offline CLIP tokenizer."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffcurate.demo.photos import photo_samples
from diffcurate.models.diffusion import load_diffusion_model, save_diffusion_model
from diffcurate.models.reference import SchedulerConfig, reference_model, reference_names
from diffcurate.models.sd_tiny import build_sd_tiny
from diffcurate.models.tokenizer import (
    BOS_TOKEN,
    CAPTION_WORDS,
    EOS_TOKEN,
    build_tokenizer,
    byte_symbols,
    clip_vocabulary,
    learn_merges,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model():
    return reference_model("sd-tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_architecture_matches_the_documented_facts(model):
    assert isinstance(model.vae, AutoencoderKL) and isinstance(model.unet, UNet2DConditionModel)
    assert model.conditional and model.sample_shape == (4, 8, 8)
    assert (n_params(model.vae), n_params(model.text_encoder.model), n_params(model.unet)) == (
        954_567,
        165_056,
        2_380_516,
    )
    assert model.text_encoder.max_length == 32
    assert model.vae.config.scaling_factor == 1.0  # until train_vae measures it
    assert model.text_encoder.hidden_size == model.unet.config.cross_attention_dim == 64
    latents = model.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8)  # downsampling factor 4
    assert model.vae.decode(latents).sample.shape == (2, 3, 32, 32)
    states = model.text_encoder.encode(["a photo of a cat", ""])
    out = model.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=states).sample
    assert out.shape == (2, 4, 8, 8)
    # The text encoder is frozen; VAE and UNet are trainable.
    assert not any(p.requires_grad for p in model.text_encoder.model.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    betas = model.scheduler.betas
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000))
    assert "sd-tiny" in reference_names() and "tiny" in reference_names()


def test_initialisation_is_seeded_per_component_and_leaves_the_global_rng_alone(model):
    state = torch.get_rng_state()
    again = build_sd_tiny(seed=0, scheduler=SchedulerConfig(prediction_type="v_prediction"))
    assert torch.equal(torch.get_rng_state(), state)
    assert again.scheduler.config.prediction_type == "v_prediction"
    other = build_sd_tiny(seed=1)
    for name in ("vae", "unet"):
        a, b = getattr(model, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        c = getattr(other, name).state_dict()
        assert not all(torch.equal(a[k], c[k]) for k in a)
    a, b = model.text_encoder.model.state_dict(), again.text_encoder.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_round_trip(model, tmp_path):
    path = save_diffusion_model(model, tmp_path / "sd-tiny")
    assert {p.name for p in path.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer"}
    loaded = load_diffusion_model(path)
    captions = ["a close-up photo of a cat, crop 3 near the top left, in dim light", ""]
    assert torch.equal(loaded.text_encoder.encode(captions), model.text_encoder.encode(captions))
    for name in ("vae", "unet"):
        a, b = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_names_list_every_reference_model():
    with pytest.raises(KeyError, match="known: digits-8px, sd-tiny, tiny"):
        reference_model("sd-huge")


def test_merges_follow_bpe_by_hand():
    # Counts: (a, b</w>) occurs in both words; then ties break on the smaller pair.
    assert learn_merges(["yab", "xab"]) == [("a", "b</w>"), ("x", "ab</w>"), ("y", "ab</w>")]
    assert learn_merges(["abc", "ab"]) == [("a", "b"), ("a", "b</w>"), ("ab", "c</w>")]
    assert learn_merges(["ab", "abc", "ab"]) == learn_merges(["abc", "ab"])


def test_vocabulary_has_clips_layout():
    vocab, merges = clip_vocabulary()
    tokens = sorted(vocab, key=vocab.get)
    symbols = list(byte_symbols())
    assert len(set(symbols)) == 256 and tokens[:256] == symbols
    assert tokens[256:512] == [s + "</w>" for s in symbols]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert list(vocab.values()) == list(range(len(vocab)))
    assert len(vocab) == 512 + len({a + b for a, b in merges} - set(tokens[:512])) + 2


def test_caption_words_are_single_tokens(tokenizer):
    for word in CAPTION_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


@pytest.mark.parametrize(
    "text", ["Supercalifragilistic QUIXOTRY!", "Zürich's naïve café — 東京 🙂", "x" * 5]
)
def test_any_text_tokenizes_without_unknown_tokens(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    # Lossless up to CLIP's lowercasing and the spaces decoding puts between words.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_every_photo_caption_fits_untruncated(tokenizer):
    made = photo_samples(heldout=20, n_train=120)
    lengths = [len(tokenizer(s.caption).input_ids) for s in made.train + made.heldout]
    assert max(lengths) <= tokenizer.model_max_length == 32
    # What the text encoder sees (padded token ids) still tells every distinct image apart.
    distinct = made.train[:120] + made.heldout
    ids = tokenizer(
        [s.caption for s in distinct], padding="max_length", truncation=True, max_length=32
    ).input_ids
    assert len({tuple(row) for row in ids}) == len(distinct)
