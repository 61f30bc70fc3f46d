"""What the trainer and the mitigation loops read training rows through.

Why an abstraction: the loops only ever need the rows of one keyed batch (``batch_indices``),
so holding the whole corpus as one tensor makes a run's memory grow with the corpus. A
:class:`TrainingData` hands out one batch at a time; :class:`TensorData` serves rows from
tensors already in memory (small corpora, tests, benchmarks) and
:class:`~diffcurate.models.lance_data.LanceTrainingData` decodes only the batch's rows from
LanceDB. Both return the same float32 rows for the same positions, so a run gives the same
weights whichever one feeds it.

The fingerprint guards resumption: a checkpoint is only resumed on the data it was trained on.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingData(Protocol):
    """Rows a diffusion model trains on, addressed by position.

    Attributes:
        sample_shape: ``(C, H, W)`` of one ``x0`` row.
        conditional: Whether :meth:`batch` returns caption states.
    """

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    @property
    def conditional(self) -> bool: ...

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x0`` float32 ``[len(idx), *sample_shape]`` on the CPU and the caption states
        ``[len(idx), seq, dim]`` (None when unconditional); ``idx`` may repeat positions."""
        ...

    def fingerprint(self, *extra: torch.Tensor | None) -> str:
        """sha256 identifying the rows (and ``extra`` tensors such as the empty caption)."""
        ...


def tensor_fingerprint(*tensors: torch.Tensor | None) -> str:
    """sha256 over the shapes, dtypes and bytes of ``tensors`` (None entries skipped)."""
    digest = hashlib.sha256()
    update_with_tensors(digest, tensors)
    return digest.hexdigest()


def update_with_tensors(digest: Any, tensors: tuple[torch.Tensor | None, ...]) -> None:
    """Feed ``tensors`` into ``digest`` as :func:`tensor_fingerprint` does."""
    for tensor in tensors:
        if tensor is not None:
            cpu = tensor.detach().to("cpu").contiguous()
            digest.update(str((tuple(cpu.shape), cpu.dtype)).encode())
            digest.update(cpu.numpy().tobytes())


class TensorData:
    """Training rows held in memory: ``x0 [N, C, H, W]`` and optional states ``[N, seq, dim]``.

    Args:
        x0: Diffusion-space inputs (pixels in [-1, 1], or VAE latents).
        conditioning: Caption states aligned with ``x0``, or None.

    Raises:
        ValueError: ``x0`` is not 4-d or the conditioning has another row count.
    """

    def __init__(self, x0: torch.Tensor, conditioning: torch.Tensor | None = None) -> None:
        if x0.ndim != 4:
            raise ValueError(f"x0 must be [N, C, H, W], got shape {tuple(x0.shape)}")
        if conditioning is not None and conditioning.shape[0] != x0.shape[0]:
            raise ValueError("conditioning must have one row per image")
        self.x0, self.conditioning = x0, conditioning

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x0.shape[1:])

    @property
    def conditional(self) -> bool:
        return self.conditioning is not None

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = None if self.conditioning is None else self.conditioning[idx]
        return self.x0[idx], cond

    def fingerprint(self, *extra: torch.Tensor | None) -> str:
        """Hash of the tensors themselves (what checkpoints trained on tensors recorded)."""
        return tensor_fingerprint(self.x0, self.conditioning, *extra)


def as_training_data(
    data: torch.Tensor | TrainingData, conditioning: torch.Tensor | None = None
) -> TrainingData:
    """``data`` itself, or tensors wrapped in :class:`TensorData`.

    Raises:
        ValueError: ``conditioning`` given beside a :class:`TrainingData` (which carries its
            own).
    """
    if isinstance(data, torch.Tensor):
        return TensorData(data, conditioning)
    if conditioning is not None:
        raise ValueError("pass conditioning inside the TrainingData, not beside it")
    return data
