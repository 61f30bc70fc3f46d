"""Tiny denoisers, VAE and schedulers shared by the influence tests (float64, seeded).

Import as ``from tiny_unets import ...`` (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


class TinyDenoiser(nn.Module):
    """An MLP with the diffusers UNet call signature: ``model(x_t, t[, encoder_hidden_states])``.

    Small enough (a few hundred parameters) for dense Hessians; tanh makes the Hessian's residual
    term non-zero, so GGN and Hessian traces differ.
    """

    def __init__(self, channels: int = 1, size: int = 3, hidden: int = 6, cond_dim: int = 0):
        super().__init__()
        self.shape = (channels, size, size)
        dim = channels * size * size
        self.inp = nn.Linear(dim + 4 + cond_dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)
        self.cond_dim = cond_dim

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> UNet2DOutput:
        t = timestep.to(sample.dtype).reshape(-1) * torch.ones(
            sample.shape[0], dtype=sample.dtype, device=sample.device
        )
        freqs = torch.tensor([1.0, 1e-1, 1e-2, 1e-3], dtype=sample.dtype, device=sample.device)
        temb = torch.cat([torch.sin(t[:, None] * freqs[:2]), torch.cos(t[:, None] * freqs[2:])], 1)
        feats = [sample.flatten(1), temb]
        if self.cond_dim:
            assert encoder_hidden_states is not None
            feats.append(encoder_hidden_states.mean(dim=1))
        h = torch.tanh(self.inp(torch.cat(feats, dim=1)))
        h = torch.tanh(self.mid(h))
        return UNet2DOutput(sample=self.out(h).reshape(sample.shape[0], *self.shape))


def tiny_mlp(seed: int = 0, **kwargs: int) -> TinyDenoiser:
    torch.manual_seed(seed)
    model = TinyDenoiser(**kwargs).double().eval()
    # Spread the weights so curvature is not dominated by one layer.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    return model


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A real diffusers UNet2DModel with conv, group-norm and self-attention blocks."""
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    return model.double().eval()


def tiny_cond_unet(seed: int = 0, cross_dim: int = 6) -> UNet2DConditionModel:
    """A real diffusers UNet2DConditionModel with cross-attention on caption embeddings."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        attention_head_dim=4,
    )
    return model.double().eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """An AutoencoderKL mapping 1×8×8 images to 1×4×4 latents."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 4),
        latent_channels=1,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=8,
    )
    return vae.double().eval()


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def images(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Deterministic images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=gen, dtype=torch.float64) * 2 - 1


def captions(n: int, seq: int = 3, dim: int = 6, seed: int = 2) -> torch.Tensor:
    """Deterministic stand-ins for caption embeddings (encoder_hidden_states)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, seq, dim), generator=gen, dtype=torch.float64) / math.sqrt(dim)


def tiny_text_encoder(workdir: Path, hidden: int = 6, max_length: int = 8, seed: int = 0):
    """A real transformers CLIP tokenizer + CLIPTextModel, tiny (character-level BPE vocab).

    The tokenizer needs vocabulary files, so they are written under ``workdir``.
    """
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffcurate.models.text_encoder import TextEncoder

    chars = list(string.ascii_lowercase + string.digits + ".,'-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=max_length
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return TextEncoder(tokenizer=tokenizer, model=CLIPTextModel(config).eval())
