"""Structural checks of a model path, without torch: what the CLI asks before anything heavy.

Loading a model needs torch and diffusers, and a flow command needs Prefect too; importing them
takes seconds on a loaded machine. A mistyped ``--model`` should not wait for that, so the
command line first asks :func:`check_model_files`, which only looks at the file system: the
path exists, a directory has the diffusers layout (``unet/config.json`` with a weights file,
``scheduler/scheduler_config.json``), a single file is a ``.safetensors`` / ``.ckpt`` checkpoint
with a ``--model-config`` directory, and every LoRA adapter exists.

It accepts a superset of what loads: weights are not read, so a corrupt file passes here and is
refused by the full load (:func:`diffcurate.models.load_options.preflight`) that follows. What
it refuses, the loader refuses too, for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from diffcurate.models.errors import ModelLoadError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Weight files (plain, variant, or a sharded index) of diffusers models and transformers models.
DIFFUSERS_WEIGHTS = (
    re.compile(r"^diffusion_pytorch_model\.(?:(?P<variant>[\w-]+)\.)?(?:safetensors|bin)$"),
    re.compile(
        r"^diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<variant>[\w-]+))?\.json$"
    ),
)
TRANSFORMERS_WEIGHTS = (
    re.compile(r"^(?:model|pytorch_model)\.(?:(?P<variant>\w+)\.)?(?:safetensors|bin)$"),
    re.compile(
        r"^(?:model|pytorch_model)\.(?:safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$"
    ),
)


def weight_variants(component_dir: Path, patterns: Sequence[re.Pattern[str]]) -> set[str | None]:
    """The weights variants present in ``component_dir`` (None: the plain weights)."""
    found: set[str | None] = set()
    for p in component_dir.iterdir():
        for pattern in patterns:
            m = pattern.match(p.name)
            if m:
                found.add(m.group("variant"))
    return found


def _check_directory(root: Path, variant: str | None) -> None:
    unet_dir, sched_dir = root / "unet", root / "scheduler"
    for component in (unet_dir, sched_dir):
        if not component.is_dir():
            raise ModelLoadError(
                f"{root} is not a diffusers model directory: missing {component.name}/ "
                f"(expected {component})"
            )
    for config in (unet_dir / "config.json", sched_dir / "scheduler_config.json"):
        if not config.is_file():
            raise ModelLoadError(f"{root} is not a diffusers model directory: missing {config}")
    found = weight_variants(unet_dir, DIFFUSERS_WEIGHTS)
    if not found:
        raise ModelLoadError(
            f"no weights file in {unet_dir}: expected diffusion_pytorch_model.safetensors "
            "(or .bin, a variant such as .fp16.safetensors, or a sharded index)"
        )
    if variant is not None and variant not in found:
        raise ModelLoadError(f"no {variant!r} weights in {unet_dir}")


def check_single_file(path: Path, config: Path | None) -> None:
    """Refuse a file that is not a single-file checkpoint, or one given without its configs."""
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path} is a file but not a checkpoint: expected a diffusers directory or a "
            f"{' / '.join(SINGLE_FILE_SUFFIXES)} file"
        )
    if config is None:
        raise ModelLoadError(
            f"{path} is a single-file checkpoint: it needs --model-config DIR (a local diffusers "
            "directory with the component configs and tokenizer), because configs cannot be "
            "downloaded"
        )
    if not config.is_dir():
        raise ModelLoadError(f"--model-config {config} is not a directory")


def check_model_files(
    path: Path,
    *,
    config: Path | None = None,
    lora: Sequence[Path] = (),
    variant: str | None = None,
) -> None:
    """Refuse a model path that cannot load, looking only at the file system.

    Args:
        path: A diffusers directory or a single-file checkpoint.
        config: The ``--model-config`` directory of a single-file checkpoint.
        lora: LoRA adapter files or directories.
        variant: The weights variant asked for (``fp16``); None accepts any.

    Raises:
        ModelLoadError: The message names the path and what is missing.
    """
    root = Path(path).expanduser()
    if root.is_file():
        check_single_file(root, None if config is None else Path(config).expanduser())
    elif root.is_dir():
        if config is not None:
            raise ModelLoadError(
                f"{root} is a diffusers directory: a model config directory is only for "
                "single-file checkpoints"
            )
        _check_directory(root, variant)
    else:
        raise ModelLoadError(
            f"model not found: {root} (expected a diffusers directory or a "
            f"{' / '.join(SINGLE_FILE_SUFFIXES)} checkpoint file)"
        )
    for adapter in lora:
        if not Path(adapter).expanduser().exists():
            raise ModelLoadError(f"LoRA adapter {adapter} does not exist")
