"""Errors of model loading, shared by the diffusion, text-encoder, single-file and LoRA loaders."""

from __future__ import annotations

SUPPORTED_LAYOUTS = (
    "supported: SD-1.x/2.x layout text-to-image pipelines (one CLIP text encoder: "
    "text_encoder/ + tokenizer/) and pixel-space UNet2DModel DDPMs"
)


class ModelLoadError(Exception):
    """A model directory is missing, incomplete or inconsistent (the message says which)."""


def sdxl_error(where: object, evidence: str) -> ModelLoadError:
    """The refusal of an SDXL model, raised before any weights are read.

    SDXL conditions its UNet on two text encoders' states plus pooled embeddings and size/crop
    time ids; scoring it as SD-1.x would fail deep inside the UNet (or, worse, compare a
    text-encoder width with a ``cross_attention_dim`` that is the sum of two), so we say what it
    is and what we support instead.
    """
    return ModelLoadError(
        f"{where} is an SDXL model ({evidence}), which is not supported; {SUPPORTED_LAYOUTS}"
    )


def one_line(err: BaseException) -> str:
    """``Type: message`` of a library error on one line (some span lines or end in blanks)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
