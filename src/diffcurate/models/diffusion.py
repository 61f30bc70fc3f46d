"""Load and save diffusion models from local paths only: diffusers directories, single-file
checkpoints, weight variants and LoRA adapters.

Layout (what ``save_pretrained`` of a diffusers pipeline writes)::

    model/
      model_index.json   optional: present in full pipeline dirs (checked, not required)
      unet/              config.json (_class_name UNet2DModel | UNet2DConditionModel) + weights
      scheduler/         scheduler_config.json
      vae/               optional: AutoencoderKL (latent diffusion)
      text_encoder/      optional, conditional UNets: CLIPTextModel (transformers)
      tokenizer/         with text_encoder/: its CLIP tokenizer

Other forms users hold, all resolved to the same :class:`DiffusionModel`:

- a single ``.safetensors`` / ``.ckpt`` checkpoint in the original SD layout, with a local
  diffusers directory for the configs (:mod:`diffcurate.models.single_file`);
- ``variant`` weights (``*.fp16.safetensors``), for every component including the text encoder;
- LoRA adapters fused into the weights at load (:mod:`diffcurate.models.lora`).

SDXL pipelines (a second text encoder and size/crop conditioning) are refused before any
weights are read, with a message naming SDXL: what we score is the SD-1.x/2.x layout.

Why our own checks before ``from_pretrained``: diffusers reports a missing or broken local
component with errors about the Hugging Face Hub (it falls back to treating the string as a
repo id), which sends users looking for a network problem. We check the layout first and raise
:class:`ModelLoadError` naming the path and what is missing or mismatched, and we always pass
``local_files_only=True`` so a typo can never become a download attempt. After loading, every
parameter must be finite: NaN/inf weights (a broken fp16 export, a diverged fine-tune) would
otherwise turn every score into NaN far downstream.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from diffcurate.models.errors import ModelLoadError, one_line, sdxl_error
from diffcurate.models.model_files import DIFFUSERS_WEIGHTS as _DIFFUSERS_WEIGHTS
from diffcurate.models.model_files import TRANSFORMERS_WEIGHTS as _TRANSFORMERS_WEIGHTS
from diffcurate.models.model_files import weight_variants
from diffcurate.models.text_encoder import TextEncoder, load_text_encoder, save_text_encoder

__all__ = [
    "DiffusionModel",
    "ModelLoadError",
    "load_diffusion_model",
    "parse_dtype",
    "save_diffusion_model",
]

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
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
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
        source: How the model was loaded (JSON-serialisable, for the run ledger): ``path``,
            ``format`` (``diffusers`` | ``single_file``), ``config``, ``variant`` (requested)
            and ``variants`` (per component, as resolved), ``dtype``, ``lora``, ``lora_scale``.
            Empty for models built in memory.
    """

    unet: UNet
    scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None
    path: Path | None = None
    text_encoder: TextEncoder | None = None
    source: dict[str, Any] = field(default_factory=dict)

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


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"float32" | "float64" | "float16" | "bfloat16"`` as a torch dtype; None stays None.

    Raises:
        ValueError: Any other name (the message lists the allowed ones).
    """
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}: expected one of {', '.join(DTYPES)} (or None)")


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


def _peek_json(path: Path) -> dict[str, Any]:
    """``path`` as a JSON object, or {} when absent or broken (the real read reports those)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _refuse_sdxl(root: Path) -> None:
    """Raise before loading anything if ``root`` holds an SDXL pipeline."""
    if (root / "text_encoder_2").is_dir():
        raise sdxl_error(root, "it has a second text encoder, text_encoder_2/")
    name = str(_peek_json(root / MODEL_INDEX).get("_class_name", ""))
    if name.startswith("StableDiffusionXL"):
        raise sdxl_error(root, f"{MODEL_INDEX} names {name}")
    if _peek_json(root / "unet" / "config.json").get("addition_embed_type") == "text_time":
        raise sdxl_error(root, "its UNet config has addition_embed_type 'text_time'")


def _class_name(config: dict[str, Any], path: Path, known: object, what: str) -> str:
    name = config.get("_class_name")
    if name not in known:  # type: ignore[operator]
        expected = ", ".join(sorted(known))  # type: ignore[call-overload]
        raise ModelLoadError(
            f"{what}: unsupported _class_name {name!r} in {path}; expected one of: {expected}"
        )
    return str(name)


def _weights_variant(
    component_dir: Path,
    variant: str | None,
    patterns: Sequence[re.Pattern[str]] = _DIFFUSERS_WEIGHTS,
) -> str | None:
    """The weights variant to load: ``variant`` if given, else the plain files if present, else
    the only variant there is (hub pipelines sometimes ship only ``*.fp16.safetensors``)."""
    found = weight_variants(component_dir, patterns)
    if not found:
        stem = "diffusion_pytorch_model" if patterns is _DIFFUSERS_WEIGHTS else "model"
        raise ModelLoadError(
            f"no weights file in {component_dir}: expected {stem}.safetensors "
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
            f"not matching config.json?): {one_line(err)}"
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


@dataclass
class _Layout:
    """What a diffusers directory holds, read from its configs (no weights)."""

    unet_class: str
    vae_class: str | None
    scheduler_config: dict[str, Any]


def _read_layout(root: Path) -> _Layout:
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
    return _Layout(unet_class=unet_class, vae_class=vae_class, scheduler_config=sched_config)


def _ddpm(layout: _Layout, root: Path) -> DDPMScheduler:
    config = {k: v for k, v in layout.scheduler_config.items() if k != "_class_name"}
    try:
        return DDPMScheduler.from_config(config)
    except Exception as err:
        raise ModelLoadError(
            f"cannot build a DDPM scheduler from {root / 'scheduler' / 'scheduler_config.json'}: "
            f"{err}"
        ) from err


def _check_text_width(root: Path, unet: UNet, text_encoder: TextEncoder) -> None:
    cross = int(unet.config.cross_attention_dim)
    if text_encoder.hidden_size != cross:
        raise ModelLoadError(
            f"{root}: text encoder width {text_encoder.hidden_size} does not match the "
            f"UNet's cross_attention_dim {cross}"
        )


def _load_directory(
    root: Path, dtype: torch.dtype | None, variant: str | None
) -> tuple[DiffusionModel, dict[str, str | None]]:
    layout = _read_layout(root)
    variants: dict[str, str | None] = {}
    variants["unet"] = _weights_variant(root / "unet", variant)
    unet = _from_pretrained(UNET_CLASSES[layout.unet_class], root / "unet", dtype, variants["unet"])
    vae = None
    if layout.vae_class is not None:
        variants["vae"] = _weights_variant(root / "vae", variant)
        vae = _from_pretrained(VAE_CLASSES[layout.vae_class], root / "vae", dtype, variants["vae"])
    scheduler = _ddpm(layout, root)
    text_encoder = None
    if layout.unet_class == "UNet2DConditionModel" and (root / "text_encoder").is_dir():
        variants["text_encoder"] = _weights_variant(
            root / "text_encoder", variant, _TRANSFORMERS_WEIGHTS
        )
        text_encoder = load_text_encoder(root, dtype=dtype, variant=variants["text_encoder"])
        _check_text_width(root, unet, text_encoder)
    model = DiffusionModel(
        unet=unet, scheduler=scheduler, vae=vae, path=root, text_encoder=text_encoder
    )
    return model, variants


def _config_layout(config: Path) -> _Layout:
    """The layout of a single-file checkpoint's config directory: an SD text-to-image one."""
    if not config.is_dir():
        raise ModelLoadError(f"model config directory {config} does not exist")
    _refuse_sdxl(config)
    layout = _read_layout(config)
    missing = [f"{n}/" for n in ("vae", "text_encoder", "tokenizer") if not (config / n).is_dir()]
    if layout.unet_class != "UNet2DConditionModel" or missing:
        raise ModelLoadError(
            f"model config {config} is not a text-to-image pipeline directory (it needs a "
            f"UNet2DConditionModel unet/, vae/, text_encoder/ and tokenizer/; unet is "
            f"{layout.unet_class}, missing: {', '.join(missing) or 'nothing'})"
        )
    if not (config / MODEL_INDEX).is_file():
        raise ModelLoadError(f"model config {config} has no {MODEL_INDEX}")
    return layout


def _load_single_file(
    path: Path, config: Path | None, dtype: torch.dtype | None, variant: str | None
) -> DiffusionModel:
    from diffcurate.models.single_file import load_single_file

    if variant is not None:
        raise ModelLoadError(
            f"{path} is a single-file checkpoint: variant={variant!r} applies to diffusers "
            "directories only"
        )
    layout = None if config is None else _config_layout(config)
    parts = load_single_file(path, config, dtype)  # refuses config=None
    assert config is not None and layout is not None
    text_encoder = TextEncoder(tokenizer=parts.tokenizer, model=parts.text_model.eval())
    _check_text_width(path, parts.unet, text_encoder)
    return DiffusionModel(
        unet=parts.unet,
        scheduler=_ddpm(layout, config),
        vae=parts.vae,
        path=path,
        text_encoder=text_encoder,
    )


def _components(model: DiffusionModel) -> dict[str, torch.nn.Module]:
    parts: dict[str, torch.nn.Module] = {"unet": model.unet}
    if model.vae is not None:
        parts["vae"] = model.vae
    if model.text_encoder is not None:
        parts["text_encoder"] = model.text_encoder.model
    return parts


def _check_finite(model: DiffusionModel, where: object) -> None:
    """Every parameter must hold real numbers (and be loaded: no meta tensors)."""
    for component, module in _components(model).items():
        bad: list[tuple[str, int, int]] = []
        for name, param in module.named_parameters():
            if param.is_meta:
                raise ModelLoadError(f"{where}: {component} parameter {name} was never loaded")
            count = int((~torch.isfinite(param.detach())).sum())
            if count:
                bad.append((name, count, param.numel()))
        if bad:
            name, count, numel = bad[0]
            more = f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
            raise ModelLoadError(
                f"{where}: {component} weights are not finite: {name} has {count} NaN/inf "
                f"values of {numel}{more}"
            )


def load_diffusion_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    lora: Sequence[str | Path] = (),
    lora_scale: float = 1.0,
    config: str | Path | None = None,
) -> DiffusionModel:
    """Load a diffusion model from a local diffusers directory or single checkpoint file.

    Args:
        path: The model (or full pipeline) directory (see the module docstring for the layout),
            or a ``.safetensors`` / ``.ckpt`` single-file SD checkpoint.
        device: Where to put the networks.
        dtype: Cast the networks to float32, float64, float16 or bfloat16 (None keeps the
            saved dtype). Half dtypes load on any device; running them is the caller's choice.
        variant: Weights variant of every component, the text encoder included (``"fp16"``
            loads ``*.fp16.safetensors``); None picks the plain weights, or the only variant
            present, per component.
        lora: LoRA adapters (files or directories) fused into the weights, in order.
        lora_scale: Multiplier of every LoRA update.
        config: For a single-file ``path``: a local diffusers pipeline directory giving the
            component configs and tokenizer (configs are never downloaded).

    Returns:
        The model in eval mode, with a ``DDPMScheduler`` built from the saved scheduler config
        and ``source`` recording how it was loaded.

    Raises:
        ModelLoadError: The path or a required component is missing, a class name is not
            supported, ``model_index.json`` disagrees with a component, weights do not load or
            are not finite, the model is SDXL, a single file comes without ``config``, or a LoRA
            adapter does not fit.
        ValueError: ``dtype`` is not one of the four supported dtypes.
    """
    dtype_name = _dtype_name(dtype)
    root = Path(path).expanduser()
    config = None if config is None else Path(config).expanduser()
    if root.is_file():
        model = _load_single_file(root, config, dtype, variant)
        variants: dict[str, str | None] = {}
    elif root.is_dir():
        if config is not None:
            raise ModelLoadError(
                f"{root} is a diffusers directory: a model config directory is only for "
                "single-file checkpoints"
            )
        _refuse_sdxl(root)
        model, variants = _load_directory(root, dtype, variant)
    else:
        raise ModelLoadError(
            f"model {root} does not exist (expected a diffusers directory or a "
            ".safetensors / .ckpt checkpoint file)"
        )
    _check_finite(model, root)
    lora_paths = [Path(p).expanduser() for p in lora]
    if lora_paths:
        from diffcurate.models.lora import fuse_lora_adapters

        text_model = model.text_encoder.model if model.text_encoder is not None else None
        fuse_lora_adapters(model.unet, text_model, lora_paths, scale=lora_scale)
        _check_finite(model, f"{root} with LoRA {', '.join(map(str, lora_paths))}")
    model.unet = model.unet.to(device).eval()
    if model.vae is not None:
        model.vae = model.vae.to(device).eval()
    if model.text_encoder is not None:
        model.text_encoder.model = model.text_encoder.model.to(device).eval()
    model.source = {
        "path": str(root),
        "format": "single_file" if root.is_file() else "diffusers",
        "config": None if config is None else str(config),
        "variant": variant,
        "variants": variants,
        "dtype": dtype_name,
        "lora": [str(p) for p in lora_paths],
        "lora_scale": float(lora_scale) if lora_paths else None,
    }
    return model


def _text_to_image_index(model: DiffusionModel) -> dict[str, Any]:
    """``model_index.json`` of a ``StableDiffusionPipeline`` (no safety checker)."""
    assert model.vae is not None and model.text_encoder is not None
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(model.scheduler).__name__],
        "text_encoder": ["transformers", type(model.text_encoder.model).__name__],
        "tokenizer": ["transformers", type(model.text_encoder.tokenizer).__name__],
        "unet": ["diffusers", type(model.unet).__name__],
        "vae": ["diffusers", type(model.vae).__name__],
    }


def save_diffusion_model(model: DiffusionModel, path: str | Path) -> Path:
    """Save in the layout :func:`load_diffusion_model` reads (safetensors weights).

    Other diffusers tooling can load the result directly: an unconditional pixel-space model
    gets a ``model_index.json`` for ``DDPMPipeline``, a text-to-image model (conditional UNet,
    VAE and text encoder) one for ``StableDiffusionPipeline`` (without safety checker).

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
    index: dict[str, Any] | None = None
    if model.vae is not None and model.text_encoder is not None and model.conditional:
        index = _text_to_image_index(model)
    elif model.vae is None and isinstance(model.unet, UNet2DModel):
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(model.scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        }
    if index is not None:
        (root / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    model.path = root
    return root
