"""Generate images from a diffusion model, reproducibly, and save them as a PNG grid.

Why one generator per image: the noise of image i (its starting point and, for DDPM, the noise
added at every step) comes from a generator seeded by ``(seed, i)`` alone. Image i is therefore
the same whatever the batch size or how many images are requested (up to the float rounding of
batched kernels, ~1e-5), so "the first 100 samples of seed 0" is a stable set for memorization
gates and reports. A repeated call with the same arguments is bitwise identical. Generators live
on the CPU, so CPU and CUDA start from identical noise.

The caller's scheduler is never mutated: each call builds a fresh sampler from its config
(``DDPMScheduler`` for ancestral sampling over all T steps, or ``DDIMScheduler`` for fast,
deterministic sampling with fewer steps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from diffcurate.influence.objective import keyed_generator
from diffcurate.models.diffusion import DiffusionModel

Sampler = Literal["ddpm", "ddim"]


def _sampler(model: DiffusionModel, kind: Sampler) -> DDPMScheduler | DDIMScheduler:
    if kind == "ddpm":
        return DDPMScheduler.from_config(model.scheduler.config)
    if kind == "ddim":
        return DDIMScheduler.from_config(model.scheduler.config)
    raise ValueError(f"unknown sampler {kind!r}; use 'ddpm' or 'ddim'")


@torch.no_grad()
def generate(
    model: DiffusionModel,
    n: int,
    *,
    seed: int = 0,
    sampler: Sampler = "ddim",
    num_inference_steps: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    conditioning: torch.Tensor | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Generate ``n`` images.

    Args:
        model: The model (moved to ``device``; left in eval mode).
        n: Number of images.
        seed: Image i's noise is seeded by ``(seed, i)`` (see the module docstring).
        sampler: ``"ddim"`` (default: fast) or ``"ddpm"`` (ancestral, the training process).
        num_inference_steps: Denoising steps; default 50 for DDIM, T for DDPM.
        batch_size: Images per network call (memory only: results do not depend on it beyond
            float rounding).
        device: Where to run.
        conditioning: ``encoder_hidden_states`` ``[n, seq, dim]`` for conditional UNets.
        eta: DDIM noise scale (0: deterministic given the starting noise).

    Returns:
        float32 ``[n, C, H, W]`` images in [-1, 1] on the CPU (decoded by the VAE when the
        model has one).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if model.conditional != (conditioning is not None):
        need = "needs" if model.conditional else "takes no"
        raise ValueError(f"{type(model.unet).__name__} {need} conditioning")
    if conditioning is not None and conditioning.shape[0] != n:
        raise ValueError(f"conditioning has {conditioning.shape[0]} rows for {n} images")
    device = torch.device(device)
    scheduler = _sampler(model, sampler)
    default_steps = 50 if sampler == "ddim" else int(scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(num_inference_steps or default_steps, device=device)
    unet = model.unet.to(device).eval()
    dtype = next(unet.parameters()).dtype
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        gens = [keyed_generator(seed, i, "sample", 0) for i in range(lo, hi)]
        x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in gens])
        x = x.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
        kwargs = {}
        if conditioning is not None:
            kwargs["encoder_hidden_states"] = conditioning[lo:hi].to(device=device, dtype=dtype)
        for t in scheduler.timesteps:
            pred = unet(scheduler.scale_model_input(x, t), t, **kwargs).sample
            step_kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = scheduler.step(pred, t, x, generator=gens, **step_kwargs).prev_sample
        if model.vae is not None:
            x = decode_latents(model, x)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent scaling of :meth:`DiffusionObjective.encode` and decode with the VAE."""
    assert model.vae is not None
    vae = model.vae
    z = latents.to(next(vae.parameters())) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    return vae.decode(z).sample


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images ``[n, C, H, W]`` → uint8 ``[n, H, W, C]`` (the inverse of the training
    scaling ``x / 127.5 - 1``, rounded and clipped)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return arr.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1
) -> Path:
    """Save images as one PNG grid (row-major, no padding), enlarged ``scale``× (nearest).

    Args:
        images: ``[n, C, H, W]`` in [-1, 1], C = 1 or 3.
        path: Output file.
        nrow: Images per row (default: ceil(sqrt(n))).
        scale: Integer upscaling so 8×8 samples are visible; nearest keeps pixels exact.

    Returns:
        The path written.
    """
    pix = to_uint8(images)
    n, h, w, c = pix.shape
    if c not in (1, 3):
        raise ValueError(f"cannot save {c}-channel images as PNG")
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = pix[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out
