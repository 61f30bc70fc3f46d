"""Load a single-file Stable Diffusion checkpoint (``.safetensors`` / ``.ckpt``), offline.

Users often hold a model as one file in the original (LDM/CompVis) key layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``).
Such a file has weights only: the architecture of each component, the tokenizer and the noise
schedule come from elsewhere. diffusers' ``from_single_file`` would fetch matching configs from
the Hugging Face Hub; nothing can be downloaded here, so the user names a local diffusers
pipeline directory of the same architecture (``--model-config DIR``) and diffusers converts the
keys with those configs (``local_files_only=True``: never a download attempt).

The file is read by diffusers' loaders: ``.safetensors`` without code execution, ``.ckpt``
through ``torch.load(weights_only=True)``. The file must hold all three networks (UNet, VAE,
CLIP text encoder); the config directory's own weights, if any, are never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcurate.models.errors import ModelLoadError, one_line, sdxl_error
from diffcurate.models.model_files import check_single_file

# Present in every SDXL base/refiner checkpoint (their second, OpenCLIP text encoder).
_SDXL_KEY_PREFIXES = ("conditioner.embedders.1.", "conditioner.embedders.0.model.")


@dataclass
class SingleFileParts:
    """The networks of a single-file checkpoint (the scheduler comes from the config dir)."""

    unet: Any
    vae: Any
    text_model: Any
    tokenizer: Any


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # not a safetensors file, truncated header, ...
        raise ModelLoadError(
            f"cannot read checkpoint {path} (corrupt or not a .safetensors file?): {one_line(err)}"
        ) from err


def load_single_file(path: Path, config: Path | None, dtype: torch.dtype | None) -> SingleFileParts:
    """The UNet, VAE, CLIP text model and tokenizer of a single-file SD checkpoint.

    Args:
        path: The checkpoint file (``.safetensors`` or ``.ckpt``).
        config: A local diffusers SD pipeline directory giving the component configs, the
            tokenizer and ``model_index.json``.
        dtype: Cast the networks to this dtype (None keeps the checkpoint's dtype).

    Raises:
        ModelLoadError: No ``config`` was given, the suffix is not a checkpoint's, the file is an
            SDXL checkpoint, or the file does not load with these configs.
    """
    check_single_file(path, config)
    if path.suffix == ".safetensors":
        sdxl = [k for k in _safetensors_keys(path) if k.startswith(_SDXL_KEY_PREFIXES)]
        if sdxl:
            raise sdxl_error(path, f"it holds SDXL text-encoder weights such as {sdxl[0]}")

    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as err:  # conversion/shape errors: ValueError, RuntimeError, KeyError, ...
        hint = ""
        if "meta tensor" in str(err):
            hint = "; the file lacks weights for layers the configs describe"
        raise ModelLoadError(
            f"cannot load checkpoint {path} with the configs in {config} (a corrupt file, or "
            f"configs of another architecture{hint}): {one_line(err)}"
        ) from err
    return SingleFileParts(
        unet=pipe.unet, vae=pipe.vae, text_model=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
