"""Checkpoints the way users hold them: SD pipeline dirs, single files, variants, LoRA, SDXL."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcurate.models.diffusion import (
    ModelLoadError,
    load_diffusion_model,
    parse_dtype,
    save_diffusion_model,
)
from tiny_pipelines import (
    HIDDEN,
    original_checkpoint,
    save_tiny_sd_pipeline,
    save_tiny_sdxl_layout,
    tiny_sd_pipeline,
)

CAPTIONS = ["a photo of a cat", ""]
UNET_W = "unet/diffusion_pytorch_model.safetensors"
TE_W = "text_encoder/model.safetensors"


def _states(model):
    return {
        "unet": model.unet.state_dict(),
        "vae": model.vae.state_dict(),
        "text_encoder": model.text_encoder.model.state_dict(),
    }


def _assert_same_weights(a, b):
    for component, state in _states(a).items():
        other = _states(b)[component]
        assert state.keys() == other.keys(), component
        for key, value in state.items():
            assert torch.equal(value, other[key]), f"{component}.{key}"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A saved tiny SD pipeline; tests that damage it work on a copy."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe", seed=0)


@pytest.fixture(scope="module")
def sd_model(sd_dir):
    return load_diffusion_model(sd_dir)


@pytest.fixture
def sd_copy(sd_dir, tmp_path):
    return shutil.copytree(sd_dir, tmp_path / "pipe")


# ---- the tiny pipeline and save_diffusion_model --------------------------------------------


def test_tiny_pipeline_shapes(tmp_path):
    model = tiny_sd_pipeline(tmp_path)
    assert model.conditional and model.sample_shape == (4, 8, 8)
    assert model.unet.config.cross_attention_dim == model.text_encoder.hidden_size == HIDDEN
    pixels = torch.zeros(2, 3, 16, 16)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean
    assert latents.shape == (2, 4, 8, 8)
    assert model.text_encoder.encode(CAPTIONS).shape == (2, 8, HIDDEN)


def test_saved_pipeline_runs_in_diffusers_and_round_trips(sd_dir, sd_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), local_files_only=True)
    out = pipe(
        CAPTIONS[0],
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    # The saved weights are exactly what diffusers itself sees...
    for name in ("unet", "vae"):
        ours, theirs = getattr(sd_model, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ...and our own save → load is bit-identical, including caption embeddings.
    again = load_diffusion_model(save_diffusion_model(sd_model, tmp_path / "again"))
    _assert_same_weights(sd_model, again)
    assert torch.equal(again.scheduler.betas, sd_model.scheduler.betas)
    assert torch.equal(again.text_encoder.encode(CAPTIONS), sd_model.text_encoder.encode(CAPTIONS))


def test_source_records_how_it_was_loaded(sd_dir, sd_model):
    assert sd_model.source == {
        "path": str(sd_dir),
        "format": "diffusers",
        "config": None,
        "variant": None,
        "variants": {"unet": None, "vae": None, "text_encoder": None},
        "dtype": None,
        "lora": [],
        "lora_scale": None,
    }
    json.dumps(sd_model.source)  # it goes into the ledger as JSON


# ---- dtype and variants --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("float32", torch.float32),
        ("float64", torch.float64),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        (None, None),
    ],
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_rejects_other_names():
    with pytest.raises(ValueError, match=r"'half'.*float32, float64, float16, bfloat16"):
        parse_dtype("half")


def test_half_dtype_loads_every_component(sd_dir, sd_model):
    half = load_diffusion_model(sd_dir, dtype=torch.bfloat16)
    for component, state in _states(half).items():
        for key, value in state.items():
            want = _states(sd_model)[component][key]
            if want.is_floating_point():
                assert value.dtype == torch.bfloat16, f"{component}.{key}"
                assert torch.equal(value, want.to(torch.bfloat16)), f"{component}.{key}"
    assert half.source["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_diffusion_model(sd_dir, dtype=torch.int8)


def test_variant_applies_to_the_text_encoder_too(sd_copy, tmp_path):
    # fp16 files hold *different* weights (another seed), so we can tell which file was read.
    other = tiny_sd_pipeline(tmp_path / "other", seed=7)
    other.unet.half().save_pretrained(sd_copy / "unet", variant="fp16")
    other.vae.half().save_pretrained(sd_copy / "vae", variant="fp16")
    other.text_encoder.model.half().save_pretrained(sd_copy / "text_encoder", variant="fp16")
    assert (sd_copy / "text_encoder" / "model.fp16.safetensors").is_file()
    plain = load_diffusion_model(sd_copy)
    fp16 = load_diffusion_model(sd_copy, variant="fp16")
    assert fp16.source["variants"] == {"unet": "fp16", "vae": "fp16", "text_encoder": "fp16"}
    _assert_same_weights(fp16, other)
    assert not torch.equal(
        plain.text_encoder.model.state_dict()["embeddings.token_embedding.weight"],
        fp16.text_encoder.model.state_dict()["embeddings.token_embedding.weight"],
    )
    # Only fp16 text-encoder weights left: the auto-pick finds them as for the other parts.
    (sd_copy / TE_W).unlink()
    auto = load_diffusion_model(sd_copy)
    assert auto.source["variants"] == {"unet": None, "vae": None, "text_encoder": "fp16"}
    assert torch.equal(
        auto.text_encoder.model.state_dict()["embeddings.token_embedding.weight"],
        other.text_encoder.model.state_dict()["embeddings.token_embedding.weight"],
    )
    with pytest.raises(ModelLoadError, match=r"no 'bf16' weights in .*unet"):
        load_diffusion_model(sd_copy, variant="bf16")


# ---- single-file checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_equals_the_directory_model(sd_dir, sd_model, tmp_path, suffix):
    state = original_checkpoint(sd_model)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in state)
    assert not any("down_blocks" in k or "resnets" in k for k in state)  # original names only
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = load_diffusion_model(path, config=sd_dir)
    _assert_same_weights(loaded, sd_model)
    assert torch.equal(loaded.scheduler.betas, sd_model.scheduler.betas)
    assert torch.equal(loaded.text_encoder.encode(CAPTIONS), sd_model.text_encoder.encode(CAPTIONS))
    assert loaded.path == path and loaded.source["format"] == "single_file"
    assert loaded.source["config"] == str(sd_dir)
    half = load_diffusion_model(path, config=sd_dir, dtype=torch.float16)
    for component, state in _states(half).items():
        for key, value in state.items():
            want = _states(sd_model)[component][key]
            if want.is_floating_point():
                assert torch.equal(value, want.half()), f"{component}.{key}"


def test_single_file_needs_a_config_dir(sd_model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(original_checkpoint(sd_model), str(path))
    with pytest.raises(ModelLoadError, match=r"needs --model-config DIR") as err:
        load_diffusion_model(path)
    assert "cannot be downloaded" in str(err.value) and "\n" not in str(err.value)


def test_single_file_missing_weights_and_bad_suffix(sd_dir, sd_model, tmp_path):
    state = original_checkpoint(sd_model)
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(ModelLoadError, match=r"cannot load checkpoint .*partial.safetensors"):
        load_diffusion_model(path, config=sd_dir)
    other = tmp_path / "model.pt"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a checkpoint"):
        load_diffusion_model(other, config=sd_dir)
    with pytest.raises(ModelLoadError, match=r"only for single-file"):
        load_diffusion_model(sd_dir, config=sd_dir)


@pytest.mark.parametrize("part", ["model.diffusion_model.", "cond_stage_model."])
def test_single_file_must_hold_every_network(sd_dir, sd_model, tmp_path, part):
    """The config dir has weights for every part, but they are never mixed into a checkpoint."""
    state = {k: v for k, v in original_checkpoint(sd_model).items() if not k.startswith(part)}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    name = "UNet2DConditionModel" if part.startswith("model.") else "CLIPTextModel"
    with pytest.raises(ModelLoadError, match=rf"partial.safetensors.*Failed to load {name}"):
        load_diffusion_model(path, config=sd_dir)


@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("model.diffusion_model.out.2.bias", "lacks weights for layers the configs describe"),
        ("first_stage_model.decoder.conv_out.bias", "lacks weights for layers the configs"),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.bias",
            "text_encoder parameter final_layer_norm.bias was never loaded",
        ),
    ],
)
def test_single_file_missing_one_tensor(sd_dir, sd_model, tmp_path, key, match):
    state = original_checkpoint(sd_model)
    del state[key]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=match):
        load_diffusion_model(path, config=sd_dir)


# ---- SDXL ----------------------------------------------------------------------------------


def _break_unet_weights(root):
    """Garbage weights: an SDXL refusal must come before any weights are read."""
    (root / UNET_W).write_bytes(b"\x00junk" * 50)


def test_sdxl_layout_is_refused_before_loading(tmp_path):
    root = save_tiny_sdxl_layout(tmp_path / "xl")
    _break_unet_weights(root)
    with pytest.raises(ModelLoadError, match=r"is an SDXL model") as err:
        load_diffusion_model(root)
    assert "SD-1.x/2.x" in str(err.value) and "one CLIP text encoder" in str(err.value)
    assert "cross_attention_dim" not in str(err.value)


@pytest.mark.parametrize("evidence", ["model_index", "unet_config"])
def test_each_sdxl_sign_is_enough(sd_copy, evidence):
    if evidence == "model_index":
        path = sd_copy / "model_index.json"
        data = json.loads(path.read_text())
        data["_class_name"] = "StableDiffusionXLPipeline"
        match = "names StableDiffusionXLPipeline"
    else:
        path = sd_copy / "unet" / "config.json"
        data = json.loads(path.read_text())
        data["addition_embed_type"] = "text_time"
        match = "addition_embed_type 'text_time'"
    path.write_text(json.dumps(data))
    _break_unet_weights(sd_copy)
    with pytest.raises(ModelLoadError, match=match):
        load_diffusion_model(sd_copy)


def test_sdxl_single_file_and_config_are_refused(sd_dir, sd_model, tmp_path):
    state = original_checkpoint(sd_model)
    state["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(8, HIDDEN)
    path = tmp_path / "xl.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"xl.safetensors is an SDXL model"):
        load_diffusion_model(path, config=sd_dir)
    plain = tmp_path / "sd.safetensors"
    save_file(original_checkpoint(sd_model), str(plain))
    xl_config = save_tiny_sdxl_layout(tmp_path / "xl-config")
    with pytest.raises(ModelLoadError, match=r"xl-config is an SDXL model"):
        load_diffusion_model(plain, config=xl_config)


# ---- non-finite and corrupt weights --------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "weights", "key"),
    [
        ("unet", UNET_W, "conv_in.weight"),
        ("vae", "vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.bias"),
        ("text_encoder", TE_W, "final_layer_norm.weight"),
    ],
)
def test_non_finite_weights_are_named(sd_copy, component, weights, key):
    state = load_file(str(sd_copy / weights))
    tensor = state[key].clone()
    tensor.view(-1)[0] = float("nan")
    tensor.view(-1)[1] = float("inf")
    state[key] = tensor
    save_file(state, str(sd_copy / weights))
    with pytest.raises(ModelLoadError) as err:
        load_diffusion_model(sd_copy)
    message = str(err.value)
    assert f"{component} weights are not finite: {key} has 2 NaN/inf values" in message
    assert str(sd_copy) in message and "\n" not in message


def test_corrupt_text_encoder_weights_name_text_encoder(sd_copy):
    (sd_copy / TE_W).write_bytes(b"\x00junk" * 50)
    with pytest.raises(
        ModelLoadError, match=r"cannot load the text_encoder weights from .*"
    ) as err:
        load_diffusion_model(sd_copy)
    assert str(sd_copy / "text_encoder") in str(err.value) and "\n" not in str(err.value)


def test_text_encoder_weights_missing_a_tensor(sd_copy):
    state = load_file(str(sd_copy / TE_W))
    del state["final_layer_norm.bias"]
    save_file(state, str(sd_copy / TE_W))
    with pytest.raises(ModelLoadError, match=r"text_encoder weights in .* do not match .*bias"):
        load_diffusion_model(sd_copy)


# ---- LoRA ----------------------------------------------------------------------------------

RANK, ALPHA, TE_ALPHA = 2, 3.0, 4.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_pairs(module, strip=""):
    """``{base weight key: (A, B)}`` of every LoRA layer injected into ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        f"{name.removeprefix(strip)}.weight": (
            m.lora_A["default"].weight.detach().double(),
            m.lora_B["default"].weight.detach().double(),
        )
        for name, m in module.named_modules()
        if isinstance(m, BaseTunerLayer)
    }


def _make_lora(fmt, base, directory):
    """Write a LoRA for ``base`` in format ``fmt``; return its path and the (A, B) per layer."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, init_lora_weights=False
    )
    if fmt == "peft":
        peft_model = get_peft_model(copy.deepcopy(base.unet), config)
        peft_model.save_pretrained(directory)
        return directory, _lora_pairs(peft_model, "base_model.model."), {}
    unet = copy.deepcopy(base.unet)
    unet.add_adapter(config)
    if fmt == "unet_adapter":
        unet.save_lora_adapter(directory)
        return directory, _lora_pairs(unet), {}
    te_config = LoraConfig(
        r=RANK, lora_alpha=TE_ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    text = inject_adapter_in_model(te_config, copy.deepcopy(base.text_encoder.model))
    # As diffusers' LoRA training scripts save them.
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text)),
        unet_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    return directory, _lora_pairs(unet), _lora_pairs(text)


@pytest.mark.parametrize("fmt", ["diffusers", "unet_adapter", "peft"])
def test_lora_is_fused_exactly(sd_dir, sd_model, tmp_path, fmt):
    from peft.tuners.tuners_utils import BaseTunerLayer

    path, unet_pairs, te_pairs = _make_lora(fmt, sd_model, tmp_path / "lora")
    # 4 transformer blocks × (self-, cross-attention) × (to_q, to_k, to_v, to_out.0)
    assert len(unet_pairs) == 32 and len(te_pairs) == (2 if fmt == "diffusers" else 0)
    scale = 0.5
    fused = load_diffusion_model(sd_dir, lora=[path], lora_scale=scale)
    for component, pairs, alpha in (
        ("unet", unet_pairs, ALPHA),
        ("text_encoder", te_pairs, TE_ALPHA),
    ):
        base, got = _states(sd_model)[component], _states(fused)[component]
        assert got.keys() == base.keys()  # plain layers again: no lora_A/lora_B left
        for key, value in base.items():
            if key in pairs:
                a, b = pairs[key]
                assert torch.count_nonzero(b) > 0
                want = value.double() + scale * (alpha / RANK) * (b @ a)
                torch.testing.assert_close(got[key].double(), want, rtol=0, atol=1e-6)
                assert not torch.equal(got[key], value)
            else:
                assert torch.equal(got[key], value), f"{component}.{key} changed"
    for module in (fused.unet, fused.text_encoder.model):
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
        assert getattr(module, "peft_config", None) is None
    assert fused.source["lora"] == [str(path)] and fused.source["lora_scale"] == scale


def test_two_adapters_add_up(sd_dir, sd_model, tmp_path):
    first, pairs1, _ = _make_lora("unet_adapter", sd_model, tmp_path / "a")
    torch.manual_seed(123)
    second, pairs2, _ = _make_lora("unet_adapter", sd_model, tmp_path / "b")
    fused = load_diffusion_model(sd_dir, lora=[first, second], lora_scale=2.0)
    base, got = sd_model.unet.state_dict(), fused.unet.state_dict()
    for key, (a1, b1) in pairs1.items():
        a2, b2 = pairs2[key]
        want = base[key].double() + 2.0 * (ALPHA / RANK) * (b1 @ a1 + b2 @ a2)
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=1e-6)


def test_bad_lora_paths_are_clear_errors(sd_dir, sd_model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"LoRA adapter .*nope does not exist"):
        load_diffusion_model(sd_dir, lora=[tmp_path / "nope"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00junk" * 50)
    with pytest.raises(ModelLoadError, match=r"cannot read LoRA adapter .*junk.safetensors"):
        load_diffusion_model(sd_dir, lora=[junk])
    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(not_lora))
    with pytest.raises(ModelLoadError, match=r"has no LoRA layers"):
        load_diffusion_model(sd_dir, lora=[not_lora])


def test_lora_of_another_model_does_not_fit(sd_dir, tmp_path):
    from tiny_pipelines import tiny_sd_unet

    other = tiny_sd_pipeline(tmp_path / "w")
    other.unet = tiny_sd_unet(cross_dim=2 * HIDDEN)  # attn2.to_k/to_v take 16 inputs, not 8
    path, _, _ = _make_lora("unet_adapter", other, tmp_path / "lora")
    with pytest.raises(ModelLoadError, match=r"LoRA adapter .* does not fit this model"):
        load_diffusion_model(sd_dir, lora=[path])


def test_lora_with_mixed_key_names_is_not_silently_partial(sd_dir, sd_model, tmp_path):
    """diffusers' converter renames attention LoRA keys but not proj_in ones; loading such a file
    applies only the proj_in layers (the rest is dropped with a log line). We refuse it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(sd_model.unet)
    unet.add_adapter(
        LoraConfig(r=RANK, target_modules=["to_q", "proj_in"], init_lora_weights=False)
    )
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(".lora.down." in k for k in state) and any(".lora_A." in k for k in state)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "mixed", unet_lora_layers=state)
    with pytest.raises(ModelLoadError, match=r"only 4 of its 12 unet LoRA layers match"):
        load_diffusion_model(sd_dir, lora=[tmp_path / "mixed"])


def test_text_encoder_lora_needs_a_text_encoder(sd_copy, sd_model, tmp_path):
    path, _, _ = _make_lora("diffusers", sd_model, tmp_path / "lora")
    shutil.rmtree(sd_copy / "text_encoder")
    shutil.rmtree(sd_copy / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"adapts a text encoder, but the model has none"):
        load_diffusion_model(sd_copy, lora=[path])


def test_lora_on_a_pixel_space_unet_is_refused(tmp_path, sd_model):
    from diffcurate.models.reference import reference_model

    pixel = save_diffusion_model(reference_model("tiny", seed=0), tmp_path / "pixel")
    path, _, _ = _make_lora("unet_adapter", sd_model, tmp_path / "lora")
    with pytest.raises(ModelLoadError, match=r"UNet2DConditionModel.*UNet2DModel"):
        load_diffusion_model(pixel, lora=[path])
