"""How a user's checkpoint is loaded: one definition shared by the CLI, the flows and the workers.

Users hold diffusion models as diffusers directories, fp16 ``variant`` weights, single
checkpoint files (with a local diffusers directory giving the configs) and LoRA adapters fused
at load. :class:`LoadOptions` carries those choices beside the model path, so a score, hygiene
or eval run records them in its parameters and every process loads the same weights.
:func:`preflight` loads the model once before any Prefect server starts, so a bad path, a
missing component or NaN weights is a one-line error, not a traceback minutes later.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.models.diffusion import DiffusionModel, load_diffusion_model, parse_dtype
from diffcurate.models.errors import ModelLoadError

DTypeName = Literal["float32", "float64", "float16", "bfloat16"]
HALF_DTYPES = frozenset({"float16", "bfloat16"})


class LoadOptions(BaseModel):
    """Loading choices for a model path.

    Attributes:
        variant: Weights variant of every component (``fp16`` loads ``*.fp16.safetensors``);
            None picks the plain weights, or the only variant present.
        dtype: Cast the networks to this dtype; None keeps the saved dtype. Half precision
            needs ``--device cuda``.
        lora: LoRA adapter files or directories, fused into the weights at load.
        lora_scale: Multiplier of every LoRA update.
        config: For a single-file checkpoint: a local diffusers directory with the component
            configs and the tokenizer (nothing can be downloaded).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant: str | None = None
    dtype: DTypeName | None = None
    lora: list[Path] = Field(default_factory=list)
    lora_scale: float = 1.0
    config: Path | None = None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The dtype as a torch dtype (None: keep the saved one)."""
        return parse_dtype(self.dtype)

    def check_device(self, device: str) -> None:
        """Half precision is for CUDA: CPU kernels for fp16 training/sampling are missing or
        far slower, so it is refused instead of silently run."""
        if self.dtype in HALF_DTYPES and not str(device).startswith("cuda"):
            raise ValueError(f"--dtype {self.dtype} needs --device cuda (got {device!r})")

    def load(self, path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
        """Load ``path`` with these options (see :func:`load_diffusion_model`)."""
        kwargs: dict[str, object] = {}
        if self.lora:
            kwargs.update(lora=list(self.lora), lora_scale=self.lora_scale)
        if self.config is not None:
            kwargs["config"] = self.config
        return load_diffusion_model(
            path, device=device, dtype=self.torch_dtype, variant=self.variant, **kwargs
        )


def _file_entries(root: Path) -> list[tuple[str, int, int]]:
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


def files_fingerprint(path: Path, options: LoadOptions | None = None) -> str:
    """Identity of the files a model is loaded from (path, size, mtime of the model, its LoRA
    adapters and its config directory) and of the options: cheap, and it changes whenever
    weights are rewritten. Hashing multi-GB weights on every run would cost minutes."""
    payload: list[object] = [str(path.resolve()), _file_entries(path)]
    if options is not None and options != LoadOptions():
        payload.append(options.model_dump(mode="json"))
        for extra in [*options.lora, *([options.config] if options.config else [])]:
            payload.append([str(extra.resolve()), _file_entries(extra)])
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def preflight(path: Path, options: LoadOptions, device: str = "cpu") -> DiffusionModel:
    """Load the model once up front, so a bad checkpoint fails with one clear line.

    Raises:
        ModelLoadError: The path does not exist or does not load (the message says why).
        ValueError: The options do not fit the device.
    """
    options.check_device(device)
    if not path.exists():
        raise ModelLoadError(
            f"model not found: {path} (a diffusers directory or a checkpoint file)"
        )
    return options.load(path)
