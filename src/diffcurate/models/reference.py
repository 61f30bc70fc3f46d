"""Named reference models: small diffusers DDPMs and a latent text-to-image pipeline we can train
on CPUs.

No weights can be downloaded at run time, so every experiment that needs a diffusion model
(memorization benchmarks, scorer tests) trains one from scratch. These configs pin down *which*
model, by name, so that a benchmark result ("recall@1% on ``digits-8px``") means the same
network everywhere:

* ``digits-8px``: 701,345 parameters for 8×8 grayscale images (scikit-learn digits). Two
  resolution levels (8×8 with 32 channels, 4×4 with 64 channels and self-attention) plus the
  attention mid block. This is the model of ``DESIGN.md``'s "Environment facts": it memorizes
  digits duplicated 30× within about 3,000 steps on a 2-core CPU.
* ``tiny``: about 11.6k parameters, the same block types at 4/8 channels, for tests that must
  train in seconds.
* ``sd-tiny``: a Stable-Diffusion-layout pipeline (VAE, CLIP text encoder, cross-attention
  ``UNet2DConditionModel``) for RGB 32×32 images; see :mod:`diffcurate.models.sd_tiny`.

The pixel-space ones are :class:`UNetArchitecture` configs (:data:`REFERENCE_ARCHITECTURES`);
pipelines have their own builders (:data:`REFERENCE_PIPELINES`), imported only when asked for
because they need ``transformers``.

Schedulers are DDPM with the original paper's linear betas (1e-4 → 0.02 over 1,000 steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.schedule import SchedulerConfig


class UNetArchitecture(BaseModel):
    """The constructor arguments of a diffusers ``UNet2DModel`` that define an architecture.

    Attributes:
        name: The reference name (recorded in configs and reports).
        sample_size: Image side length in pixels.
        in_channels: 1 for grayscale, 3 for RGB (the output has as many channels).
        block_out_channels: Channels per resolution level.
        layers_per_block: ResNet layers per down block (up blocks get one more, as in diffusers).
        down_block_types: diffusers down block class names, one per level.
        up_block_types: diffusers up block class names, one per level (deepest first).
        norm_num_groups: GroupNorm groups; must divide every channel count.
        attention_head_dim: Channels per attention head.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sample_size: int = Field(ge=1)
    in_channels: int = Field(ge=1)
    block_out_channels: tuple[int, ...]
    layers_per_block: int = Field(1, ge=1)
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    norm_num_groups: int = Field(ge=1)
    attention_head_dim: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> UNetArchitecture:
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError("need one down and one up block type per entry of block_out_channels")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide {bad}")
        if self.sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size {self.sample_size} is not divisible by 2^{levels - 1}")
        return self

    def build(self, seed: int = 0) -> UNet2DModel:
        """A freshly initialised float32 ``UNet2DModel`` (initialisation seeded, then restored).

        Why a local generator state: seeding the global RNG would silently change every later
        random draw of the caller; ``torch.random.fork_rng`` keeps initialisation reproducible
        without that side effect.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return UNet2DModel(
                sample_size=self.sample_size,
                in_channels=self.in_channels,
                out_channels=self.in_channels,
                block_out_channels=self.block_out_channels,
                layers_per_block=self.layers_per_block,
                down_block_types=self.down_block_types,
                up_block_types=self.up_block_types,
                norm_num_groups=self.norm_num_groups,
                attention_head_dim=self.attention_head_dim,
            )


REFERENCE_ARCHITECTURES: dict[str, UNetArchitecture] = {
    arch.name: arch
    for arch in (
        UNetArchitecture(
            name="digits-8px",
            sample_size=8,
            in_channels=1,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=16,
        ),
        UNetArchitecture(
            name="tiny",
            sample_size=8,
            in_channels=1,
            block_out_channels=(4, 8),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=2,
            attention_head_dim=4,
        ),
    )
}


def reference_architecture(name: str) -> UNetArchitecture:
    """Look up a reference architecture, failing with the list of known names."""
    try:
        return REFERENCE_ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(REFERENCE_ARCHITECTURES))
        raise KeyError(f"unknown reference architecture {name!r}; known: {known}") from None


def _sd_tiny(seed: int, scheduler: SchedulerConfig | None) -> DiffusionModel:
    from diffcurate.models.sd_tiny import build_sd_tiny  # imports transformers: only on demand

    return build_sd_tiny(seed, scheduler)


REFERENCE_PIPELINES: dict[str, Callable[[int, SchedulerConfig | None], DiffusionModel]] = {
    "sd-tiny": _sd_tiny
}
"""Builders of the reference pipelines, by name: ``(seed, scheduler) -> DiffusionModel``."""


def reference_names() -> list[str]:
    """Every name :func:`reference_model` accepts, sorted."""
    return sorted([*REFERENCE_ARCHITECTURES, *REFERENCE_PIPELINES])


def reference_model(
    name: str, seed: int = 0, scheduler: SchedulerConfig | None = None
) -> DiffusionModel:
    """A freshly initialised reference model with its DDPM scheduler.

    Args:
        name: ``digits-8px`` or ``tiny`` (pixel-space, unconditional, no VAE) or ``sd-tiny``
            (latent text-to-image: VAE, text encoder, conditional UNet); see
            :func:`reference_names`.
        seed: Initialisation seed.
        scheduler: Noise schedule; the DDPM default (linear betas, ε prediction) if None.

    Returns:
        A :class:`~diffcurate.models.diffusion.DiffusionModel` with ``path=None`` (not saved).

    Raises:
        KeyError: Unknown name (the message lists the known ones).
    """
    if name in REFERENCE_PIPELINES:
        return REFERENCE_PIPELINES[name](seed, scheduler)
    if name not in REFERENCE_ARCHITECTURES:
        known = ", ".join(reference_names())
        raise KeyError(f"unknown reference architecture {name!r}; known: {known}")
    unet = reference_architecture(name).build(seed)
    sched = (scheduler or SchedulerConfig()).build()
    return DiffusionModel(unet=unet, scheduler=sched, vae=None, path=None)
