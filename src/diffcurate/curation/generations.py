"""Generate from the original and the candidate model, and audit both sets for group shares.

The two models are sampled from the same keyed initial noises (seed ``measure.seed + 3``, a
stream of its own beside the gate's memorization, utility and calibration generations) and, for
text-conditional models, the same prompts: ``generations`` captions drawn with replacement,
by a seeded generator, from the corpus's distinct captions, so the prompts follow the corpus
rather than a hand-picked list. Each set is labelled with the image-based inferred attributes
(:class:`~diffcurate.curation.inferred.ImageLabeller`: CLIP zero-shot prompts and the face
detector) and the shares are compared by
:func:`~diffcurate.metrics.generations_audit.audit_generations`.
Caption-derived attributes are not used here: a generation's prompt is the same before and
after, so they could never change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.config import AttributeSettings, ClipSettings
from diffcurate.curation.inferred import ImageLabeller
from diffcurate.curation.measure import MeasureConfig, to_unit
from diffcurate.metrics.generations_audit import (
    GenerationsAuditPolicy,
    GenerationsAuditResult,
    audit_generations,
)
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.sample import generate

SEED_OFFSET = 3
"""The generations audit's noise stream: ``measure.seed + 3``."""


class GenerationsAuditConfig(BaseModel):
    """How the hygiene run audits the generations of both models.

    Attributes:
        enabled: Audit the generations (the gate then checks the result, failing closed when
            no attribute can be inferred).
        generations: Generations per model.
        attributes: The image-based attributes: zero-shot prompts and rule, face counts.
        clip: The CLIP checkpoint for zero-shot attributes (None: zero-shot skipped).
        policy: When a change of group shares is a violation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    generations: int = Field(256, ge=2)
    attributes: AttributeSettings = Field(default_factory=AttributeSettings)
    clip: ClipSettings | None = None
    policy: GenerationsAuditPolicy = Field(default_factory=GenerationsAuditPolicy)


class GenerationsAuditReport(BaseModel):
    """The generations audit of one hygiene run.

    Attributes:
        result: The audit (None when nothing could be inferred).
        inferred_by: Attribute → what inferred it.
        generations: Generations per model.
        prompts: How the prompts were chosen (empty for unconditional models).
        skipped: Attribute sources that could not be used, with why.
    """

    model_config = ConfigDict(frozen=True)

    result: GenerationsAuditResult | None
    inferred_by: dict[str, str]
    generations: int
    prompts: str
    skipped: list[str]


def draw_prompts(captions: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` prompts drawn with replacement from the distinct non-empty captions."""
    distinct = sorted({c for c in captions if c and c.strip()})
    if not distinct:
        raise ValueError("the corpus has no captions to prompt with")
    pick = np.random.default_rng(seed).integers(0, len(distinct), size=n)
    return [distinct[i] for i in pick]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[n, C, H, W]`` in [-1, 1] → 8-bit RGB PIL images."""
    pixels = np.round(to_unit(images) * 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return [Image.fromarray(p) for p in pixels]


def sample_for_audit(
    model: DiffusionModel,
    n: int,
    measure: MeasureConfig,
    prompts: Sequence[str] | None,
) -> torch.Tensor:
    """``n`` generations from the audit's noise stream (prompts for conditional models)."""
    seed = measure.seed + SEED_OFFSET
    if not model.conditional:
        return generate(model, n, seed=seed, num_inference_steps=measure.inference_steps,
                        device=measure.device)  # fmt: skip
    if model.text_encoder is None:
        raise ValueError("a text-conditional model needs its text encoder (text_encoder/)")
    if prompts is None:
        raise ValueError("a text-conditional model is audited from prompts")
    cond = model.text_encoder.encode(list(prompts))
    uncond = model.text_encoder.encode([""])
    return generate(model, n, seed=seed, num_inference_steps=measure.inference_steps,
                    conditioning=cond, guidance_scale=measure.guidance_scale,
                    unconditional=uncond, device=measure.device)  # fmt: skip


def audit_model_generations(
    before: DiffusionModel,
    after: DiffusionModel,
    config: GenerationsAuditConfig,
    measure: MeasureConfig,
    captions: Sequence[str],
    labeller: ImageLabeller | None = None,
) -> GenerationsAuditReport:
    """Sample both models alike, label both sets, compare the group shares.

    Args:
        before: The original model.
        after: The candidate model.
        config: Generations, attributes and policy.
        measure: The gate's sampling settings (steps, guidance, device, seed).
        captions: The corpus's captions (prompts of conditional models are drawn from them).
        labeller: Labels the images (default: built from ``config``).

    Returns:
        The audit, or a report with ``result=None`` saying why nothing could be inferred.
    """
    labeller = labeller or ImageLabeller.from_settings(config.attributes, config.clip)
    n = config.generations
    if not labeller.available:
        return GenerationsAuditReport(result=None, inferred_by={}, generations=n, prompts="",
                                      skipped=labeller.skipped)  # fmt: skip
    prompts, described = None, ""
    if before.conditional or after.conditional:
        prompts = draw_prompts(captions, n, measure.seed + SEED_OFFSET)
        distinct = len({c for c in captions if c and c.strip()})
        described = (
            f"{n} captions drawn with replacement from the corpus's {distinct} distinct captions"
        )
    labels_before = labeller.label(to_pil(sample_for_audit(before, n, measure, prompts)))
    labels_after = labeller.label(to_pil(sample_for_audit(after, n, measure, prompts)))
    return GenerationsAuditReport(
        result=audit_generations(labels_before, labels_after, config.policy),
        inferred_by=labeller.provenance(),
        generations=n,
        prompts=described,
        skipped=labeller.skipped,
    )
