"""Load and save diffusion models in the diffusers directory layout, from local paths only.

Layout (what ``save_pretrained`` of a diffusers pipeline writes)::

    model/
      model_index.json   optional: present in full pipeline dirs (checked, not required)
      unet/              config.json (_class_name UNet2DModel | UNet2DConditionModel) + weights
      scheduler/         scheduler_config.json
      vae/               optional: AutoencoderKL (latent diffusion)
      text_encoder/      optional, conditional UNets: CLIPTextModel (transformers)
      tokenizer/         with text_encoder/: its CLIP tokenizer

Why our own checks before ``from_pretrained``: diffusers reports a missing or broken local
component with errors about the Hugging Face Hub (it falls back to treating the string as a
repo id), which sends users looking for a network problem. We check the layout first and raise
:class:`ModelLoadError` naming the path and what is missing or mismatched, and we always pass
``local_files_only=True`` so a typo can never become a download attempt.

The scheduler is always returned as a ``DDPMScheduler`` built from the saved config, whatever
sampler the pipeline shipped with (PNDM, DDIM, Euler, ...): training and influence scoring use
the forward noising process, which all these schedulers share through their beta schedule.
Text-to-image pipelines: a conditional UNet's ``text_encoder/`` and ``tokenizer/`` are loaded
too when present (:mod:`diffcurate.models.text_encoder`); without them the model still loads
(training and sampling with given embeddings work) and scoring from captions refuses clearly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from diffcurate.models.errors import ModelLoadError
from diffcurate.models.text_encoder import TextEncoder, load_text_encoder, save_text_encoder

__all__ = ["DiffusionModel", "ModelLoadError", "load_diffusion_model", "save_diffusion_model"]

UNET_CLASSES: dict[str, type[UNet2DModel] | type[UNet2DConditionModel]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}
VAE_CLASSES: dict[str, type[AutoencoderKL]] = {"AutoencoderKL": AutoencoderKL}
# Schedulers whose config defines the same DDPM forward process (betas over T train steps).
SCHEDULER_CLASSES = frozenset(
    {
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "LMSDiscreteScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "HeunDiscreteScheduler",
    }
)
_WEIGHT_FILE = re.compile(
    r"^diffusion_pytorch_model\.(?:(?P<variant>[\w-]+)\.)?(?:safetensors|bin)$"
)
_WEIGHT_INDEX = re.compile(
    r"^diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<variant>[\w-]+))?\.json$"
)
MODEL_INDEX = "model_index.json"

UNet = UNet2DModel | UNet2DConditionModel


@dataclass
class DiffusionModel:
    """A denoiser with its noise schedule (and VAE for latent diffusion).

    Attributes:
        unet: The denoising network.
        scheduler: The DDPM forward process (``config.prediction_type`` picks ε or v).
        vae: The latent autoencoder, or None for pixel-space models.
        path: Where the model was loaded from or last saved to (None if only in memory).
        text_encoder: Caption encoder of a text-conditional pipeline, if it ships one.
    """

    unet: UNet
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None
    path: Path | None = None
    text_encoder: TextEncoder | None = None

    @property
    def conditional(self) -> bool:
        """Whether the UNet needs ``encoder_hidden_states`` (text conditioning)."""
        return isinstance(self.unet, UNet2DConditionModel)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample in diffusion space (latent space when there is a VAE)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet.config.in_channels), int(h), int(w)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{what}: missing {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{what}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what}: {path} must hold a JSON object")
    return data


def _class_name(config: dict[str, Any], path: Path, known: object, what: str) -> str:
    name = config.get("_class_name")
    if name not in known:  # type: ignore[operator]
        expected = ", ".join(sorted(known))  # type: ignore[call-overload]
        raise ModelLoadError(
            f"{what}: unsupported _class_name {name!r} in {path}; expected one of: {expected}"
        )
    return str(name)


def _weights_variant(component_dir: Path, variant: str | None) -> str | None:
    """The weights variant to load: ``variant`` if given, else the plain files if present, else
    the only variant there is (hub pipelines sometimes ship only ``*.fp16.safetensors``)."""
    found: set[str | None] = set()
    for p in component_dir.iterdir():
        m = _WEIGHT_FILE.match(p.name) or _WEIGHT_INDEX.match(p.name)
        if m:
            found.add(m.group("variant"))
    if not found:
        raise ModelLoadError(
            f"no weights file in {component_dir}: expected diffusion_pytorch_model.safetensors "
            "(or .bin, a variant such as .fp16.safetensors, or a sharded index)"
        )
    if variant is not None:
        if variant not in found:
            raise ModelLoadError(f"no {variant!r} weights in {component_dir}")
        return variant
    if None in found:
        return None
    if len(found) > 1:
        raise ModelLoadError(
            f"{component_dir} holds only variant weights {sorted(map(str, found))}: "
            "pass variant=..."
        )
    return found.pop()


def _from_pretrained(
    cls: Any, component_dir: Path, dtype: torch.dtype | None, variant: str | None
) -> Any:
    """``cls.from_pretrained`` on a local directory, wrapping failures in ModelLoadError."""
    variant = _weights_variant(component_dir, variant)
    try:
        model, info = cls.from_pretrained(
            str(component_dir),
            local_files_only=True,
            torch_dtype=dtype,
            variant=variant,
            low_cpu_mem_usage=False,  # without `accelerate` diffusers would warn and do this
            output_loading_info=True,
        )
    except Exception as err:  # corrupt files raise OSError, SafetensorError, ValueError, ...
        raise ModelLoadError(
            f"cannot load {cls.__name__} weights from {component_dir} (corrupt, truncated or "
            f"not matching config.json?): {type(err).__name__}: {err}"
        ) from err
    # diffusers only warns about these; a half-initialised network must not pass as trained.
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {list(v)[:5]}" for k, v in problems.items())
        raise ModelLoadError(f"weights in {component_dir} do not match config.json ({detail})")
    return model


def _check_model_index(root: Path, unet_class: str, vae_class: str | None) -> None:
    """A pipeline's ``model_index.json`` must agree with the component configs it names."""
    index = _read_json(root / MODEL_INDEX, "pipeline index")
    for component, actual in (("unet", unet_class), ("vae", vae_class)):
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
            if actual is None:
                raise ModelLoadError(
                    f"{root / MODEL_INDEX} lists a {component} ({entry[1]}) but {root / component}"
                    " is missing"
                )
            if entry[1] != actual:
                raise ModelLoadError(
                    f"{root / MODEL_INDEX} says {component} is {entry[1]} but "
                    f"{root / component / 'config.json'} says {actual}"
                )


def load_diffusion_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> DiffusionModel:
    """Load a diffusion model from a local diffusers-format directory.

    Args:
        path: The model (or full pipeline) directory; see the module docstring for the layout.
        device: Where to put the networks.
        dtype: Cast the networks to this dtype (None keeps the saved dtype).
        variant: Weights variant (``"fp16"`` loads ``*.fp16.safetensors``); None picks the plain
            weights, or the only variant present.

    Returns:
        The model in eval mode, with a ``DDPMScheduler`` built from the saved scheduler config.

    Raises:
        ModelLoadError: The directory or a required component is missing, a class name is not
            supported, ``model_index.json`` disagrees with a component, or weights do not load.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} does not exist (or is not a directory)")
    unet_dir, sched_dir, vae_dir = root / "unet", root / "scheduler", root / "vae"
    for component in (unet_dir, sched_dir):
        if not component.is_dir():
            raise ModelLoadError(
                f"{root} is not a diffusers model directory: missing {component.name}/ "
                f"(expected {component})"
            )

    unet_config = _read_json(unet_dir / "config.json", "unet config")
    unet_class = _class_name(unet_config, unet_dir / "config.json", UNET_CLASSES, "unet")
    sched_config = _read_json(sched_dir / "scheduler_config.json", "scheduler config")
    _class_name(sched_config, sched_dir / "scheduler_config.json", SCHEDULER_CLASSES, "scheduler")
    vae_class = None
    if vae_dir.is_dir():
        vae_config = _read_json(vae_dir / "config.json", "vae config")
        vae_class = _class_name(vae_config, vae_dir / "config.json", VAE_CLASSES, "vae")
    if (root / MODEL_INDEX).exists():
        _check_model_index(root, unet_class, vae_class)

    unet = _from_pretrained(UNET_CLASSES[unet_class], unet_dir, dtype, variant)
    vae = None
    if vae_class is not None:
        vae = _from_pretrained(VAE_CLASSES[vae_class], vae_dir, dtype, variant)
        vae = vae.to(device).eval()
    try:
        scheduler = DDPMScheduler.from_config(
            {k: v for k, v in sched_config.items() if k != "_class_name"}
        )
    except Exception as err:
        raise ModelLoadError(
            f"cannot build a DDPM scheduler from {sched_dir / 'scheduler_config.json'}: {err}"
        ) from err
    text_encoder = None
    if unet_class == "UNet2DConditionModel" and (root / "text_encoder").is_dir():
        text_encoder = load_text_encoder(root, device=device, dtype=dtype)
        cross = int(unet.config.cross_attention_dim)
        if text_encoder.hidden_size != cross:
            raise ModelLoadError(
                f"{root}: text encoder width {text_encoder.hidden_size} does not match the "
                f"UNet's cross_attention_dim {cross}"
            )
    return DiffusionModel(
        unet=unet.to(device).eval(),
        scheduler=scheduler,
        vae=vae,
        path=root,
        text_encoder=text_encoder,
    )


def save_diffusion_model(model: DiffusionModel, path: str | Path) -> Path:
    """Save in the layout :func:`load_diffusion_model` reads (safetensors weights).

    An unconditional pixel-space model also gets a ``model_index.json`` for diffusers'
    ``DDPMPipeline``, so other diffusers tooling can load it directly.

    Args:
        model: What to save; ``model.path`` is updated to the saved location.
        path: Target directory; created if absent, must be empty if present (so components of
            an older model, e.g. a stale ``vae/``, can never mix with the new one).

    Returns:
        The directory written.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory.
    """
    root = Path(path).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"refusing to save a model into non-empty {root}")
    root.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(root / "unet", safe_serialization=True)
    model.scheduler.save_pretrained(root / "scheduler")
    if model.text_encoder is not None:
        save_text_encoder(model.text_encoder, root)
    if model.vae is not None:
        model.vae.save_pretrained(root / "vae", safe_serialization=True)
    elif isinstance(model.unet, UNet2DModel):
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(model.scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (root / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    model.path = root
    return root
