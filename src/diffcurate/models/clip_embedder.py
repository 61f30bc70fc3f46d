"""open_clip image/text embeddings from a local checkpoint.

Loading goes through open_clip's own ``pretrained=<path>`` code path, the same one a user with
real ViT-B-32 weights on disk takes. We refuse anything that is not an existing local file:
open_clip would otherwise treat an unknown string as a hub tag and try to download it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffcurate.config import ClipSettings

log = logging.getLogger(__name__)


class EmbeddingsDisabledError(RuntimeError):
    """Raised when embeddings are requested but no CLIP checkpoint is configured."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("clip.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


class ClipEmbedder:
    """L2-normalised open_clip embeddings for images and captions.

    Args:
        settings: Model name, local checkpoint file, optional architecture JSON, device.
    """

    def __init__(self, settings: ClipSettings) -> None:
        # Imported here: open_clip (with timm, transformers, torchvision) takes seconds to
        # import, and every module that can embed would make every command pay it.
        import open_clip

        if settings.checkpoint is None:
            raise EmbeddingsDisabledError(
                "no CLIP checkpoint configured (clip.checkpoint / DIFFCURATE_CLIP__CHECKPOINT)"
            )
        checkpoint = Path(settings.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint}")
        if settings.architecture_file is not None:
            arch = Path(settings.architecture_file)
            if not arch.is_file():
                raise FileNotFoundError(f"CLIP architecture file not found: {arch}")
            if arch.stem != settings.model:
                raise ValueError(
                    f"clip.model is {settings.model!r} but the architecture file defines "
                    f"{arch.stem!r} (open_clip names a config by its file stem)"
                )
            open_clip.add_model_config(arch)
        if settings.model not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip architecture {settings.model!r}; set clip.architecture_file "
                "to its JSON config"
            )
        self.device = resolve_device(settings.device)
        self.batch_size = settings.batch_size
        self.name = f"{settings.model}@{checkpoint.name}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                settings.model, pretrained=str(checkpoint), device=self.device
            )
        except RuntimeError as err:
            raise ValueError(
                f"CLIP checkpoint {checkpoint} does not match architecture {settings.model!r}: "
                f"{err}"
            ) from err
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(settings.model)
        log.info("loaded CLIP %s on %s", self.name, self.device)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images; returns float32 ``[n, d]`` with unit-norm rows."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(img) for img in chunk]).to(self.device)
            feats = self.model.encode_image(pixels)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed captions; returns float32 ``[n, d]`` with unit-norm rows."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            feats = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
