"""``sd-tiny``: a Stable-Diffusion-layout text-to-image pipeline small enough to train on CPUs.

Users hold latent text-to-image pipelines (VAE + CLIP text encoder + cross-attention UNet),
and every stage of the platform must work on that model class. No such pipeline can be
downloaded here, so this is the reference one we train ourselves, with SD's components at a
32×32 scale:

* VAE: diffusers ``AutoencoderKL``, RGB 32×32 → 4 latent channels at 8×8 (downsampling factor
  4: three encoder levels of 32/64/64 channels, one ResNet layer each, plus the attention mid
  block), 954,567 parameters. ``scaling_factor`` is 1.0 until
  :func:`~diffcurate.models.vae_train.train_vae` measures it.
* Text encoder: transformers ``CLIPTextModel``, hidden size 64, 2 layers of 4 heads, 32 token
  positions, 165,056 parameters (983-token vocabulary), with the offline tokenizer of
  :mod:`diffcurate.models.tokenizer`. Frozen, as in SD; without pretrained weights it is a
  fixed random encoding of the caption, which is enough to tell captions apart.
* UNet: diffusers ``UNet2DConditionModel`` on the 4×8×8 latents, two levels of 48/96 channels
  (``CrossAttnDownBlock2D`` ×2, ``CrossAttnUpBlock2D`` ×2, cross-attention mid block), 4
  attention heads, ``cross_attention_dim`` 64 = the text width; 2,380,516 parameters.
* Scheduler: DDPM with the linear betas of the other reference models
  (:class:`~diffcurate.models.reference.SchedulerConfig`).

Training order, as in SD: the VAE first on the pixels, then the UNet on the scaled VAE
latents conditioned on the text encoder's ``last_hidden_state``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffcurate.keyed import keyed_seed
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.schedule import SchedulerConfig
from diffcurate.models.text_encoder import TextEncoder
from diffcurate.models.tokenizer import build_tokenizer

NAME = "sd-tiny"
IMAGE_SIZE = 32
LATENT_CHANNELS = 4
MAX_LENGTH = 32
TEXT_WIDTH = 64


def _seeded(seed: int, component: str) -> None:
    """Seed the (forked) global RNG per component, so each one's initialisation depends only
    on the seed and its own architecture."""
    torch.manual_seed(keyed_seed(seed, NAME, component, 0))


def build_vae() -> AutoencoderKL:
    """The untrained autoencoder (initialised from the global RNG)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_text_encoder() -> TextEncoder:
    """The frozen CLIP text encoder and its tokenizer (initialised from the global RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(max_length=MAX_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config).eval().requires_grad_(False)
    return TextEncoder(tokenizer=tokenizer, model=model)


def build_unet() -> UNet2DConditionModel:
    """The untrained cross-attention UNet (initialised from the global RNG)."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(48, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers' historical name: this is the number of heads
    )


def build_sd_tiny(seed: int = 0, scheduler: SchedulerConfig | None = None) -> DiffusionModel:
    """A freshly initialised ``sd-tiny`` pipeline (module docstring), float32, on the CPU.

    Initialisation uses a forked RNG (the caller's global RNG state is untouched), seeded per
    component from ``seed``.

    Args:
        seed: Initialisation seed.
        scheduler: Noise schedule; the DDPM default (linear betas, ε prediction) if None.

    Returns:
        A :class:`~diffcurate.models.diffusion.DiffusionModel` with ``vae`` and
        ``text_encoder`` set and ``path=None``.
    """
    with torch.random.fork_rng(devices=[]):
        _seeded(seed, "vae")
        vae = build_vae()
        _seeded(seed, "text_encoder")
        text_encoder = build_text_encoder()
        _seeded(seed, "unet")
        unet = build_unet()
    return DiffusionModel(
        unet=unet,
        # Latents are not bounded to [-1, 1]: no x0 clipping (Stable Diffusion's setting).
        scheduler=(scheduler or SchedulerConfig()).build(clip_sample=False),
        vae=vae,
        path=None,
        text_encoder=text_encoder,
    )
