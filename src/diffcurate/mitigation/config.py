"""Settings of a mitigation run: one model for every method, validated against the registry.

Fields a method does not use are ignored by it (``retrain_*`` by the fine-tunes, ``forget_*``
by methods without a forgetting term), so one config travels through the CLI, the flows and
the ledger unchanged whichever method it names.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffcurate.mitigation.base import get_mitigation


class MitigationConfig(BaseModel):
    """How the candidate model is produced from the pruned set.

    Attributes:
        method: A registered mitigation (``finetune``, ``layer-finetune``, ``erasediff``,
            ``gradient-ascent``, ``retrain``).
        steps: Optimiser steps of the fine-tune methods; None = ``epochs`` passes over the kept
            samples (seed 000's recipe: one epoch).
        epochs: Passes over the kept samples when ``steps`` is None.
        lr: Fine-tune learning rate (AdamW).
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

    method: str = "erasediff"
    steps: int | None = Field(None, ge=1)
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
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
