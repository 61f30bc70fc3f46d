"""Fuse LoRA adapters into a text-to-image model at load time, with diffusers' + peft's loaders.

Accepted adapters (files or directories, local only):

- diffusers LoRA files, as ``StableDiffusionPipeline.save_lora_weights`` writes them
  (``pytorch_lora_weights.safetensors``, keys ``unet.…`` / ``text_encoder.…``), including the
  kohya/A1111 formats diffusers converts (``lora_unet_…``, ``lora_te_…``);
- a UNet adapter saved by ``UNet2DConditionModel.save_lora_adapter`` (keys without a prefix);
- a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as
  ``PeftModel.save_pretrained`` writes it for a UNet).

Each adapter is injected (peft), merged into the base weights as W + scale·(α/r)·B·A, and the
LoRA layers are then removed, so the result is a plain model: scoring, training and saving see
ordinary ``nn.Linear``/``nn.Conv2d`` weights, and what was fused is recorded by the caller.

Why we count layers after loading: diffusers silently skips keys it does not recognise (a
file whose keys lack the ``unet.`` prefix, or mixes two key conventions, loads as a no-op
or a partial adapter with only a log line). A fused model that silently equals the base model
would make every downstream comparison meaningless, so every LoRA matrix pair in the file must
have become a LoRA layer, or loading fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffcurate.models.errors import ModelLoadError, one_line, sdxl_error

UNET, TEXT_ENCODER = "unet", "text_encoder"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


def _peft_adapter(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict (``unet.``-prefixed) and LoraConfig kwargs of a peft adapter directory."""
    from safetensors.torch import load_file

    config = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
    weights = next((directory / n for n in PEFT_WEIGHTS if (directory / n).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"LoRA adapter {directory} has {PEFT_CONFIG} but no {PEFT_WEIGHTS[0]}")
    if weights.suffix == ".safetensors":
        raw = load_file(str(weights))
    else:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
    state = {f"{UNET}.{k.removeprefix(_PEFT_PREFIX)}": v for k, v in raw.items()}
    return state, {f"{UNET}.{k}": v for k, v in config.items()}


def _diffusers_adapter(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    from diffusers import StableDiffusionPipeline

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(path), local_files_only=True, return_lora_metadata=True
    )
    prefixes = {k.split(".", 1)[0] for k in state}
    if prefixes & {"text_encoder_2", "te2", "lora_te2"}:
        raise sdxl_error(f"LoRA adapter {path}", "it adapts a second text encoder")
    if not prefixes & {UNET, TEXT_ENCODER}:
        # ``save_lora_adapter`` of a UNet writes keys (and metadata) without a component prefix.
        state = {f"{UNET}.{k}": v for k, v in state.items()}
        if metadata:
            metadata = {f"{UNET}.{k}": v for k, v in metadata.items()}
        if alphas:
            alphas = {f"{UNET}.{k}": v for k, v in alphas.items()}
    return state, alphas, metadata


def _read_adapter(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    if not path.exists():
        raise ModelLoadError(f"LoRA adapter {path} does not exist")
    try:
        if path.is_dir() and (path / PEFT_CONFIG).is_file():
            state, metadata = _peft_adapter(path)
            return state, None, metadata
        return _diffusers_adapter(path)
    except ModelLoadError:
        raise
    except Exception as err:  # missing/corrupt files raise OSError, SafetensorError, ValueError..
        raise ModelLoadError(
            f"cannot read LoRA adapter {path} (expected a diffusers pytorch_lora_weights"
            f".safetensors file or directory, or a peft adapter directory): "
            f"{one_line(err)}"
        ) from err


def _pairs(state: dict[str, torch.Tensor], prefix: str) -> int:
    """LoRA layers of one component in ``state``: each has a down and an up matrix (ndim >= 2,
    whatever the key convention); biases, magnitudes and alphas are vectors or scalars."""
    matrices = sum(
        1 for k, v in state.items() if k.startswith(f"{prefix}.") and "lora" in k and v.ndim >= 2
    )
    return matrices // 2


def _only(prefix: str, mapping: dict[str, Any] | None) -> dict[str, Any] | None:
    """Entries of ``mapping`` for one component, or None (diffusers reads {} as 'no rank info')."""
    if not mapping:
        return None
    picked = {k: v for k, v in mapping.items() if k.startswith(f"{prefix}.")}
    return picked or None


def _lora_layers(module: torch.nn.Module, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(
        1
        for m in module.modules()
        if isinstance(m, BaseTunerLayer)
        and (adapter in getattr(m, "lora_A", {}) or adapter in getattr(m, "lora_embedding_A", {}))
    )


def _remove_peft_layers(text_model: torch.nn.Module) -> None:
    """Replace a transformers model's (merged) LoRA layers by their base layers."""
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(text_model)
    if getattr(text_model, "peft_config", None) is not None:
        del text_model.peft_config
        text_model._hf_peft_config_loaded = False


def _inject_text_encoder_lora(
    state: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    text_model: Any,
    adapter: str,
) -> None:
    """Inject and load the ``text_encoder.`` LoRA layers with peft directly.

    diffusers' ``load_lora_into_text_encoder`` goes through transformers' peft integration,
    which demands a newer peft than the package index offers; peft's own injection does the same
    (the key conversions are diffusers', as in that loader).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    prefix = f"{TEXT_ENCODER}."
    sd = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(text_model, "text_model"):  # CLIPTextModel is flat in transformers >= 5.6
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    meta = {k.removeprefix(prefix): v for k, v in (_only(TEXT_ENCODER, metadata) or {}).items()}
    if meta:
        config = LoraConfig(**meta)
    else:
        rank = {k: v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
        te_alphas = {
            k.removeprefix(prefix): v for k, v in (_only(TEXT_ENCODER, alphas) or {}).items()
        }
        config = LoraConfig(**get_peft_kwargs(rank, te_alphas or None, sd, is_unet=False))
    inject_adapter_in_model(config, text_model, adapter_name=adapter, state_dict=sd)
    result = set_peft_model_state_dict(text_model, sd, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise ValueError(f"text encoder LoRA keys match no layer: {unexpected[:3]}")


def fuse_lora_adapters(
    unet: torch.nn.Module,
    text_model: torch.nn.Module | None,
    paths: Sequence[str | Path],
    scale: float = 1.0,
) -> None:
    """Merge each LoRA adapter in ``paths`` (in order) into ``unet`` / ``text_model`` in place.

    Args:
        unet: A ``UNet2DConditionModel`` (diffusers' peft integration).
        text_model: The pipeline's ``CLIPTextModel``, or None if the model ships no text encoder
            (then adapters with text-encoder layers are refused).
        paths: Adapter files or directories (see the module docstring for the formats).
        scale: Multiplier of every adapter's update (``lora_scale`` in diffusers).

    Raises:
        ModelLoadError: An adapter does not exist or does not read, holds no LoRA layers, has
            layers the model lacks (or of other shapes), targets a text encoder the model does
            not have, or is for SDXL.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    if not isinstance(unet, UNet2DConditionModel):
        raise ModelLoadError(
            f"LoRA adapters are supported on text-to-image UNets (UNet2DConditionModel); this "
            f"model's UNet is a {type(unet).__name__}"
        )
    for index, raw_path in enumerate(paths):
        path = Path(raw_path).expanduser()
        state, alphas, metadata = _read_adapter(path)
        counts = {prefix: _pairs(state, prefix) for prefix in (UNET, TEXT_ENCODER)}
        other = [k for k in state if not k.startswith((f"{UNET}.", f"{TEXT_ENCODER}."))]
        if other or not any(counts.values()):
            shown = other[:3] or list(state)[:3]
            raise ModelLoadError(
                f"LoRA adapter {path} has no LoRA layers for the UNet or the text encoder "
                f"(keys such as {shown})"
            )
        if counts[TEXT_ENCODER] and text_model is None:
            raise ModelLoadError(
                f"LoRA adapter {path} adapts a text encoder, but the model has none"
            )
        adapter = f"fused_{index}"
        try:
            if counts[UNET]:
                StableDiffusionPipeline.load_lora_into_unet(
                    state,
                    network_alphas=_only(UNET, alphas),
                    unet=unet,
                    adapter_name=adapter,
                    metadata=_only(UNET, metadata),
                )
            if counts[TEXT_ENCODER]:
                _inject_text_encoder_lora(state, alphas, metadata, text_model, adapter)
        except Exception as err:  # unknown modules, shape mismatches: ValueError, RuntimeError
            raise ModelLoadError(
                f"LoRA adapter {path} does not fit this model: {one_line(err)}"
            ) from err
        for prefix, module in ((UNET, unet), (TEXT_ENCODER, text_model)):
            if counts[prefix] and module is not None:
                made = _lora_layers(module, adapter)
                if made != counts[prefix]:
                    raise ModelLoadError(
                        f"LoRA adapter {path}: only {made} of its {counts[prefix]} {prefix} "
                        "LoRA layers match the model's layers (mixed or unknown key names?)"
                    )
        if counts[UNET]:
            unet.fuse_lora(lora_scale=scale, adapter_names=[adapter])
            unet.unload_lora()
        if counts[TEXT_ENCODER]:
            fuse_text_encoder_lora(text_model, lora_scale=scale, adapter_names=[adapter])
            _remove_peft_layers(text_model)
