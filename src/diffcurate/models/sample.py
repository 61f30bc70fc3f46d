"""Generate images from a diffusion model, reproducibly, and save them as a PNG grid.

Why one generator per image: the noise of image i (its starting point and, for DDPM, the noise
added at every step) comes from a generator seeded by ``(seed, i)`` alone. Image i is therefore
the same whatever the batch size or how many images are requested (up to the float rounding of
batched kernels, ~1e-5), so "the first 100 samples of seed 0" is a stable set for memorization
gates and reports. A repeated call with the same arguments is bitwise identical. Generators live
on the CPU, so CPU and CUDA start from identical noise.

Classifier-free guidance (Ho & Salimans 2022), as diffusers' ``StableDiffusionPipeline`` does
it: at scale g the network prediction is ``pred_u + g * (pred_c - pred_u)``, both halves from one
batched network call on ``[unconditional; conditional]`` inputs. It is applied to whatever the
UNet predicts (ε or v), as diffusers does. Why it matters here: text-to-image models are sampled
with guidance in practice (Stable Diffusion: 7.5), and a caption-prompted model may reproduce a
training image only under guidance, so a memorization gate that samples without it under-reads.
With g = 1, or without an unconditional embedding, sampling is the plain conditional path.

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

from diffcurate.keyed import keyed_generator
from diffcurate.models.diffusion import DiffusionModel

Sampler = Literal["ddpm", "ddim"]


def _sampler(model: DiffusionModel, kind: Sampler) -> DDPMScheduler | DDIMScheduler:
    """A fresh sampler from the model's schedule. Latent models never clip the predicted x0
    to [-1, 1]: latents are unit-variance, not bounded, and clipping them (diffusers' DDPM
    default, right for pixels) pulls every generation away from the training latents."""
    extra = {"clip_sample": False} if model.vae is not None else {}
    if kind == "ddpm":
        return DDPMScheduler.from_config(model.scheduler.config, **extra)
    if kind == "ddim":
        return DDIMScheduler.from_config(model.scheduler.config, **extra)
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
    guidance_scale: float = 1.0,
    unconditional: torch.Tensor | None = None,
    decode: bool = True,
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
        guidance_scale: Classifier-free guidance scale g (conditional models; needs
            ``unconditional`` unless it is 1). 1 is plain conditional sampling, bit for bit.
        unconditional: The empty caption's ``encoder_hidden_states``, ``[1, seq, dim]`` (shared
            by all images) or ``[n, seq, dim]``; ignored when ``guidance_scale`` is 1.
        decode: Latent models: False returns the raw latents (unclamped) instead of images.

    Returns:
        float32 ``[n, C, H, W]`` images in [-1, 1] on the CPU (decoded by the VAE when the
        model has one), or a latent model's latents with ``decode=False``.

    Raises:
        ValueError: Conditioning missing for a conditional model (or given to an unconditional
            one), guidance asked for without ``unconditional`` or for an unconditional model,
            or mismatched shapes.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    name = type(model.unet).__name__
    if model.conditional != (conditioning is not None):
        need = "needs" if model.conditional else "takes no"
        raise ValueError(f"{name} {need} conditioning")
    if conditioning is not None and conditioning.shape[0] != n:
        raise ValueError(f"conditioning has {conditioning.shape[0]} rows for {n} images")
    guided = _check_guidance(model, n, conditioning, guidance_scale, unconditional)
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
            cond = conditioning[lo:hi].to(device=device, dtype=dtype)
            if guided:
                assert unconditional is not None
                shared = len(unconditional) != n  # one [1, seq, dim] row for every image
                uncond = unconditional.expand(hi - lo, -1, -1) if shared else unconditional[lo:hi]
                cond = torch.cat([uncond.to(device=device, dtype=dtype), cond])
            kwargs["encoder_hidden_states"] = cond
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            if guided:
                both = unet(torch.cat([x_in, x_in]), t, **kwargs).sample
                pred_u, pred_c = both.chunk(2)
                pred = pred_u + guidance_scale * (pred_c - pred_u)
            else:
                pred = unet(x_in, t, **kwargs).sample
            step_kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = scheduler.step(pred, t, x, generator=gens, **step_kwargs).prev_sample
        if model.vae is not None and not decode:
            out.append(x.float().cpu())
            continue
        if model.vae is not None:
            x = decode_latents(model, x)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def _check_guidance(
    model: DiffusionModel,
    n: int,
    conditioning: torch.Tensor | None,
    guidance_scale: float,
    unconditional: torch.Tensor | None,
) -> bool:
    """Validate the guidance arguments; True when sampling is guided (g != 1)."""
    name = type(model.unet).__name__
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    if not model.conditional:
        if guidance_scale != 1.0 or unconditional is not None:
            raise ValueError(f"classifier-free guidance needs a text-conditional model, not {name}")
        return False
    if guidance_scale == 1.0:
        return False
    if unconditional is None:
        raise ValueError(
            f"guidance_scale {guidance_scale:g} needs `unconditional`: the empty caption's "
            "encoder states (e.g. model.text_encoder.encode(['']))"
        )
    assert conditioning is not None
    if unconditional.ndim != 3 or len(unconditional) not in (1, n):
        raise ValueError(f"unconditional must be [1, seq, dim] or [{n}, seq, dim], "
                         f"got {tuple(unconditional.shape)}")  # fmt: skip
    if unconditional.shape[1:] != conditioning.shape[1:]:
        raise ValueError(f"unconditional states {tuple(unconditional.shape[1:])} differ from "
                         f"the conditioning's {tuple(conditioning.shape[1:])}")  # fmt: skip
    return True


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
