"""The mitigation interface: what a method receives, what it returns, and the registry.

A mitigation turns the released model and the pruned split of its training data into a
candidate model, without touching the released model. Methods differ in what they optimise
(continued training, a frozen subset, a forgetting term on the removed samples) and in what
they need (the removed samples too, or only the kept ones), so each is one module that
registers itself here under the name the CLI and flows use; adding a method is one file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from diffcurate.models.diffusion import DiffusionModel

if TYPE_CHECKING:
    from diffcurate.mitigation.config import MitigationConfig


@dataclass(frozen=True)
class MitigationData:
    """The pruned split in the space the UNet consumes (pixels, or VAE latents).

    Attributes:
        retain: ``x0`` of the kept samples ``[N, C, H, W]``.
        retain_cond: Their caption states ``[N, seq, dim]`` (text-conditional models).
        forget: ``x0`` of the removed samples (methods with a forgetting term), or None.
        forget_cond: Their caption states.
        unconditional: The empty caption's states ``[1, seq, dim]`` (caption dropout).
    """

    retain: torch.Tensor
    retain_cond: torch.Tensor | None = None
    forget: torch.Tensor | None = None
    forget_cond: torch.Tensor | None = None
    unconditional: torch.Tensor | None = None


@dataclass
class MitigationResult:
    """What a mitigation did, in the units the benchmark compares methods by.

    Attributes:
        method: The registered method name.
        losses: Retain-set diffusion loss of every optimiser step.
        forget_losses: Forget-set loss of every step (methods with a forgetting term).
        steps: Optimiser steps taken.
        sample_passes: Forward+backward evaluations of one sample, summed over the run: the
            compute measure set against retraining's ``steps × batch``.
        seconds: Wall time.
        trainable: Names of the parameters that were updated; None = all of them.
        detail: Method-specific record (selected layers, multipliers, ...).
    """

    method: str
    losses: list[float]
    steps: int
    sample_passes: int
    seconds: float
    forget_losses: list[float] = field(default_factory=list)
    trainable: tuple[str, ...] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Mitigation(Protocol):
    """One mitigation method.

    Attributes:
        name: Registry name (``--mitigation``).
        needs_forget: Whether :attr:`MitigationData.forget` must be given.
        summary: One line for ``--help`` and the docs.
    """

    name: str
    needs_forget: bool
    summary: str

    def steps_for(self, config: MitigationConfig, n_retain: int) -> int:
        """Optimiser steps the method takes on ``n_retain`` kept samples."""
        ...

    def run(
        self, model: DiffusionModel, data: MitigationData, config: MitigationConfig, progress: bool
    ) -> tuple[DiffusionModel, MitigationResult]:
        """Produce the candidate (a new model; ``model`` is left unchanged)."""
        ...


_REGISTRY: dict[str, Mitigation] = {}


def register_mitigation(method: Mitigation) -> Mitigation:
    """Add ``method`` under its name (a second method of the same name is refused)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"a mitigation named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_mitigation(name: str) -> Mitigation:
    """The registered method ``name``; a clear error naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown mitigation {name!r}; use one of {', '.join(mitigation_names())}"
        ) from None


def mitigation_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def copy_of(model: DiffusionModel) -> DiffusionModel:
    """A candidate sharing the frozen VAE and text encoder but with its own UNet and scheduler."""
    return DiffusionModel(
        unet=copy.deepcopy(model.unet),
        scheduler=copy.deepcopy(model.scheduler),
        vae=model.vae,
        text_encoder=model.text_encoder,
    )
