"""Tiny Stable-Diffusion-layout pipelines (and an SDXL-layout one) for loading tests.

Import as ``from tiny_pipelines import ...`` (``tests/`` is on ``sys.path``). Everything is built
offline from seeded random weights; the CLIP tokenizer's vocabulary is written under
``workdir``. Sizes: RGB 16×16 pixels, a VAE with 4-channel 8×8 latents, a 1-layer CLIP text
encoder of width 8 (8 tokens), a cross-attention UNet with ``cross_attention_dim`` 8.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from diffcurate.models.diffusion import DiffusionModel, save_diffusion_model
from tiny_unets import tiny_text_encoder

HIDDEN = 8
MAX_LENGTH = 8


def tiny_sd_unet(seed: int = 0, cross_dim: int = HIDDEN) -> UNet2DConditionModel:
    """A 4-channel 8×8 latent UNet in the SD-1.x block pattern (cross-attention, then plain)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
    ).eval()


def tiny_sd_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL mapping RGB 16×16 images to 4×8×8 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def tiny_sd_pipeline(workdir: Path, seed: int = 0) -> DiffusionModel:
    """A float32 SD-layout text-to-image model (UNet + VAE + CLIP text encoder, DDPM).

    Builds in well under a second; saved (:func:`save_tiny_sd_pipeline`) it is a directory that
    ``diffusers.StableDiffusionPipeline.from_pretrained`` loads and runs.

    Args:
        workdir: Where the tokenizer's vocabulary files are written.
        seed: Seeds the weights (the UNet, VAE and text encoder get seed, seed+1, seed+2).
    """
    return DiffusionModel(
        unet=tiny_sd_unet(seed),
        # SD's schedule settings (diffusers' SD pipeline warns about the DDPM defaults).
        scheduler=DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False),
        vae=tiny_sd_vae(seed + 1),
        text_encoder=tiny_text_encoder(
            Path(workdir) / "vocab", hidden=HIDDEN, max_length=MAX_LENGTH, seed=seed + 2
        ),
    )


def save_tiny_sd_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build :func:`tiny_sd_pipeline` and save it (with ``model_index.json``) to ``directory``."""
    directory = Path(directory)
    model = tiny_sd_pipeline(directory.parent / f"{directory.name}-vocab", seed=seed)
    return save_diffusion_model(model, directory)


def save_tiny_sdxl_layout(directory: Path, seed: int = 0) -> Path:
    """An SDXL-layout directory: a second text encoder and a ``text_time`` UNet.

    The UNet really is SDXL-shaped (``addition_embed_type="text_time"``, its add-embedding input
    sized for the pooled text embedding plus six time ids); the two text encoders are tiny CLIPs.
    """
    directory = Path(directory)
    base = save_tiny_sd_pipeline(directory, seed=seed)
    torch.manual_seed(seed)
    pooled, time_dim = HIDDEN, 4
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=2 * HIDDEN,
        attention_head_dim=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
    )
    for sub in (base / "unet").iterdir():
        sub.unlink()
    unet.save_pretrained(base / "unet", safe_serialization=True)
    from transformers import CLIPTextModelWithProjection

    second = tiny_text_encoder(
        directory.parent / f"{directory.name}-vocab2", hidden=HIDDEN, max_length=MAX_LENGTH
    )
    config = second.model.config
    config.projection_dim = pooled
    CLIPTextModelWithProjection(config).save_pretrained(base / "text_encoder_2")
    second.tokenizer.save_pretrained(base / "tokenizer_2")
    index = json.loads((base / "model_index.json").read_text())
    index.update(
        _class_name="StableDiffusionXLPipeline",
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
    )
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key, None)
    (base / "model_index.json").write_text(json.dumps(index, indent=2))
    return base


# ---- original (LDM / CompVis) single-file layout: the inverse of diffusers' conversion ----

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _ldm_unet_key(key: str, config: dict) -> str:
    per = int(config["layers_per_block"]) + 1
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind, idx = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{1 + block * per + per - 1}.0.op.{'.'.join(parts[5:])}"
            slot = 0 if kind == "resnets" else 1
            i = 1 + block * per + idx
            inner = _rename(rest, _UNET_RESNET) if kind == "resnets" else rest
            return f"input_blocks.{i}.{slot}.{inner}"
        if kind == "upsamplers":
            i = block * per + per - 1
            has_attention = "Attn" in config["up_block_types"][block]
            return f"output_blocks.{i}.{2 if has_attention else 1}.{'.'.join(parts[4:])}"
        slot = 0 if kind == "resnets" else 1
        inner = _rename(rest, _UNET_RESNET) if kind == "resnets" else rest
        return f"output_blocks.{block * per + idx}.{slot}.{inner}"
    if parts[0] == "mid_block":
        kind, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * idx}.{_rename(rest, _UNET_RESNET)}"
    return _rename(key, _UNET_TOP)


def _ldm_vae_key(key: str, value: torch.Tensor, config: dict) -> tuple[str, torch.Tensor]:
    coder, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    parts = rest.split(".")
    n_up = len(config["up_block_types"])
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind = int(parts[1]), parts[2]
        level = block if parts[0] == "down_blocks" else n_up - 1 - block
        name = "down" if parts[0] == "down_blocks" else "up"
        if kind in ("downsamplers", "upsamplers"):
            sample = "downsample" if kind == "downsamplers" else "upsample"
            new = f"{name}.{level}.{sample}.{'.'.join(parts[4:])}"
        else:
            inner = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{name}.{level}.block.{parts[3]}.{inner}"
    elif parts[0] == "mid_block":
        inner = ".".join(parts[3:])
        if parts[1] == "attentions":
            new = f"mid.attn_1.{_rename(inner, _VAE_ATTENTION)}"
            if value.ndim == 2:  # the original attention is 1×1 convolutions
                value = value[:, :, None, None]
        else:
            new = f"mid.block_{int(parts[2]) + 1}.{inner.replace('conv_shortcut', 'nin_shortcut')}"
    else:
        new = _rename(rest, _VAE_TOP)
    return (f"{coder}.{new}" if coder else new), value


def original_checkpoint(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """The state dict of an SD-layout ``model`` with the original (LDM/CompVis) key names.

    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
    ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder): what the original
    ``v1-5-pruned.safetensors`` style single files hold.
    """
    assert model.vae is not None and model.text_encoder is not None
    out: dict[str, torch.Tensor] = {}
    unet_config = dict(model.unet.config)
    for key, value in model.unet.state_dict().items():
        out[f"model.diffusion_model.{_ldm_unet_key(key, unet_config)}"] = value.clone()
    vae_config = dict(model.vae.config)
    for key, value in model.vae.state_dict().items():
        new, value = _ldm_vae_key(key, value, vae_config)
        out[f"first_stage_model.{new}"] = value.clone()
    for key, value in model.text_encoder.model.state_dict().items():
        inner = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{inner}"] = value.clone()
    return out
