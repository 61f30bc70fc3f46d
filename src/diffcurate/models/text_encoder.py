"""Caption embeddings for text-conditional UNets: the pipeline's own CLIP text encoder, locally.

A text-to-image pipeline saved by diffusers (Stable Diffusion layout) ships its text encoder and
tokenizer beside the UNet::

    model/
      text_encoder/   config.json (architectures: CLIPTextModel) + model.safetensors
      tokenizer/      tokenizer.json or vocab.json + merges.txt, tokenizer_config.json

The UNet was trained on exactly these embeddings (``last_hidden_state`` of the caption padded
to ``model_max_length``, as the diffusers pipelines compute them), so scoring must use the same
encoder: a different CLIP would condition the UNet on inputs it never saw. That is also why we
do not reuse the open_clip model of the ingest step here.

``transformers`` is imported lazily: it adds seconds to start-up and only conditional models
need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffcurate.models.errors import ModelLoadError, one_line

TEXT_ENCODER_CLASSES = frozenset({"CLIPTextModel"})


@dataclass
class TextEncoder:
    """A tokenizer and text model producing ``encoder_hidden_states`` for a conditional UNet.

    Attributes:
        tokenizer: A ``transformers`` CLIP tokenizer.
        model: A ``transformers.CLIPTextModel`` in eval mode.
    """

    tokenizer: Any
    model: Any

    @property
    def max_length(self) -> int:
        """Token positions per caption (captions are padded/truncated to it, as in training)."""
        return int(self.tokenizer.model_max_length)

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings; must equal the UNet's ``cross_attention_dim``."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(
        self,
        captions: Sequence[str],
        batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``[n, max_length, hidden_size]`` embeddings of ``captions`` (``""`` = unconditional).

        Args:
            captions: One caption per sample; the empty string gives the unconditional
                embedding classifier-free guidance uses.
            batch_size: Captions per forward pass (memory bound only).
            dtype: Dtype of the returned tensor.
            device: Device of the returned tensor.
        """
        param = next(self.model.parameters())
        out = []
        for s in range(0, len(captions), batch_size):
            tokens = self.tokenizer(
                list(captions[s : s + batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            hidden = self.model(tokens.input_ids.to(param.device)).last_hidden_state
            out.append(hidden.to(dtype=dtype, device=device))
        if not out:
            return torch.empty((0, self.max_length, self.hidden_size), dtype=dtype, device=device)
        return torch.cat(out)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_text_encoder(
    root: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> TextEncoder:
    """Load ``text_encoder/`` and ``tokenizer/`` of a local pipeline directory.

    Args:
        root: The pipeline directory.
        device: Where to put the text model.
        dtype: Cast the text model to this dtype (None keeps the saved dtype).
        variant: Weights variant (``"fp16"`` loads ``model.fp16.safetensors``); the caller
            resolves it (:func:`diffcurate.models.diffusion.load_diffusion_model` applies one
            rule to every component), None loads the plain weights.

    Raises:
        ModelLoadError: A folder is missing, the class is not a CLIP text model, or the files
            do not load or do not match ``config.json`` (the message names the path).
    """
    import json

    root = Path(root).expanduser()
    enc_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    for component in (enc_dir, tok_dir):
        if not component.is_dir():
            raise ModelLoadError(
                f"{root} has a text-conditional UNet but no {component.name}/: scoring needs the "
                "pipeline's text encoder and tokenizer to embed captions (expected "
                f"{component})"
            )
    config_path = enc_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"text encoder: cannot read {config_path} ({err})") from err
    arch = (config.get("architectures") or [None])[0]
    if arch not in TEXT_ENCODER_CLASSES:
        raise ModelLoadError(
            f"text encoder: unsupported architecture {arch!r} in {config_path}; expected one "
            f"of {sorted(TEXT_ENCODER_CLASSES)}"
        )
    _quiet_transformers()
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as err:  # missing vocab files raise OSError, TypeError, ValueError, ...
        raise ModelLoadError(f"cannot load the tokenizer from {tok_dir}: {one_line(err)}") from err
    try:
        model, info = CLIPTextModel.from_pretrained(
            enc_dir, local_files_only=True, dtype=dtype, variant=variant, output_loading_info=True
        )
    except Exception as err:  # corrupt files raise OSError, SafetensorError, ValueError, ...
        raise ModelLoadError(
            f"cannot load the text_encoder weights from {enc_dir} (corrupt, truncated or not "
            f"matching config.json?): {one_line(err)}"
        ) from err
    # transformers only warns about these; a half-initialised encoder must not pass as trained.
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ModelLoadError(
            f"text_encoder weights in {enc_dir} do not match config.json ({detail})"
        )
    return TextEncoder(tokenizer=tokenizer, model=model.to(device).eval())


def save_text_encoder(encoder: TextEncoder, root: str | Path) -> None:
    """Write ``text_encoder/`` and ``tokenizer/`` under ``root`` (the layout loaded above)."""
    _quiet_transformers()
    root = Path(root)
    encoder.model.save_pretrained(root / "text_encoder", safe_serialization=True)
    encoder.tokenizer.save_pretrained(root / "tokenizer")
