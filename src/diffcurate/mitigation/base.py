"""The mitigation interface: what a method receives, what it returns, and the registry.

A mitigation turns the released model and the pruned split of its training data into a
candidate model, without touching the released model. Methods differ in what they optimise
(continued training, a frozen subset, a forgetting term on the removed samples) and in what
they need (the removed samples too, or only the kept ones), so each is one module that
registers itself here under the name the CLI and flows use; adding a method is one file.

One settings model serves every method: fields a method does not use are ignored by it
(``retrain_*`` by the fine-tunes, ``forget_*`` by methods without a forgetting term), so one
config travels through the CLI, the flows and the ledger unchanged whichever method it names.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.training_data import TrainingData


@dataclass(frozen=True)
class MitigationData:
    """The pruned split in the space the UNet consumes (pixels, or VAE latents).

    Both sides are :class:`~diffcurate.models.training_data.TrainingData`, read one keyed batch
    at a time, so a method never needs a split in memory.

    Attributes:
        retain: The kept samples (``x0`` rows and, for text-conditional models, their caption
            states).
        forget: The removed samples (methods with a forgetting term), or None.
        unconditional: The empty caption's states ``[1, seq, dim]`` (caption dropout).
    """

    retain: TrainingData
    forget: TrainingData | None = None
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


class MitigationConfig(BaseModel):
    """How the candidate model is produced from the pruned set.

    Attributes:
        method: A registered mitigation (``finetune``, ``layer-finetune``, ``erasediff``,
            ``gradient-ascent``, ``retrain``). The default, a fine-tune at the rate the model
            was trained at for ~4% of its training compute, is the method that measured best
            in ``benchmarks/mitigation.py`` (README, "Mitigation").
        steps: Optimiser steps of the fine-tune methods. Setting ``epochs`` (and not
            ``steps``) counts passes over the kept samples instead; None always does.
        epochs: Passes over the kept samples when ``steps`` is not in force (seed 000's
            recipe: one epoch).
        lr: Fine-tune learning rate (AdamW). The measured default, 1e-3, is the rate the
            reference models train at: the fine-tune works at the model's training rate and
            does nothing far below it (seed 000's 2e-6 left Mem% unchanged). For a model
            trained at another rate, use that rate.
        warmup_steps: Linear learning-rate warm-up over this many steps.
        batch_size: Kept samples per step.
        forget_batch_size: Removed samples per step (methods with a forgetting term).
        forget_weight: Weight of the capped forgetting term (``gradient-ascent``).
        forget_cap: Cap on the forget-set loss the ascent may reach (``gradient-ascent``); 1.0
            is the loss of a model that predicts nothing (the target's variance).
        erase_inner_steps: EraseDiff: gradient steps approximating the forgetting optimum.
        erase_inner_lr: EraseDiff: their (plain SGD) learning rate. It must be large enough
            for ``φ_K`` to move: with a tiny step ``∇f(φ_K) ≈ ∇f(θ)``, ``∇q`` vanishes and the
            update never forgets.
        erase_eta: EraseDiff: the value-function update's η (how fast the constraint must
            shrink relative to its gradient).
        layer_coverage: ``layer-finetune``: fine-tune the fewest layers that hold this share of
            the removed samples' excess curvature.
        layer_probe_samples: ``layer-finetune``: removed and kept samples whose per-layer
            curvature decides the layers.
        caption_noise: Text-conditional models: std of Gaussian noise added to caption states,
            relative to their std (Somepalli et al. 2023, "GNI").
        caption_replace: Text-conditional models: share of rows whose caption is swapped for
            another kept sample's (Somepalli et al. 2023, random caption replacement).
        caption_dropout: Text-conditional models: share of captions replaced by the empty
            caption (SD's 0.1), so guidance keeps working on the candidate.
        retrain_steps: Optimiser steps when retraining.
        retrain_lr: Learning rate when retraining.
        seed: Seeds data order and noise (and the fresh initialisation when retraining).
        device: ``cpu`` or ``cuda``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = "finetune"
    steps: int | None = Field(64, ge=1)
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(6, ge=0)
    batch_size: int = Field(64, ge=1)
    forget_batch_size: int = Field(32, ge=1)
    forget_weight: float = Field(1.0, gt=0)
    forget_cap: float = Field(1.0, gt=0)
    erase_inner_steps: int = Field(1, ge=1)
    erase_inner_lr: float = Field(0.1, gt=0)
    erase_eta: float = Field(0.1, ge=0)
    layer_coverage: float = Field(0.5, gt=0, le=1)
    layer_probe_samples: int = Field(32, ge=1)
    caption_noise: float = Field(0.0, ge=0)
    caption_replace: float = Field(0.0, ge=0, le=1)
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    retrain_steps: int = Field(3000, ge=1)
    retrain_lr: float = Field(1e-3, gt=0)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _epochs_without_steps(cls, data: Any) -> Any:
        """Asking for ``epochs`` without ``steps`` means passes, not the default step count."""
        if isinstance(data, dict) and "epochs" in data and "steps" not in data:
            return {**data, "steps": None}
        return data

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_mitigation(name)
        return name

    def fine_tune_steps(self, n_retain: int) -> int:
        """Steps of a fine-tune method: ``steps``, or ``epochs`` passes over the kept set."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(n_retain / self.batch_size)

    def steps_for(self, n_retain: int) -> int:
        """Optimiser steps the configured method takes on ``n_retain`` kept samples."""
        return get_mitigation(self.method).steps_for(self, n_retain)

    @property
    def needs_forget(self) -> bool:
        """Whether the method needs the removed samples as well as the kept ones."""
        return get_mitigation(self.method).needs_forget
