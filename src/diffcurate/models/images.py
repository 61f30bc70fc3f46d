"""Turn ingested samples into the pixel tensor a diffusion model trains on.

Conversion of one image, in this order (the same for training, scoring and gating, so a model
never sees pixels prepared differently from the ones it was trained on):

1. Decode the stored bytes with PIL and convert to RGB (alpha dropped), exactly as ingestion
   did when it hashed the image; for 1-channel models convert that to 8-bit luma ``L``
   (ITU-R 601-2: ``L = 0.299 R + 0.587 G + 0.114 B``, exact for gray inputs).
2. Center-crop to a square (the largest one), so non-square images are cropped, not squashed.
3. Resize to the model's ``sample_size``: ``BOX`` (area averaging) when shrinking, because it
   averages every source pixel into the output and so does not alias fine strokes; ``BILINEAR``
   when enlarging, where area averaging would just replicate pixels into blocks. Images already
   at the target size are not resampled at all.
4. Scale 8-bit values to [-1, 1]: ``x / 127.5 - 1`` (0 → -1, 255 → 1), float32.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffcurate.models.diffusion import UNet
from diffcurate.storage.lance_store import LanceStore


class ImageLoadError(ValueError):
    """A stored sample cannot be turned into a training image (the message names it)."""


@dataclass(frozen=True)
class TrainingImages:
    """Images ready for a diffusion model.

    Attributes:
        pixels: float32 ``[N, C, H, W]`` in [-1, 1].
        sample_ids: The sample id of each row of ``pixels``, in the same order.
    """

    pixels: torch.Tensor
    sample_ids: list[str]


def prepare_image(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """Convert one decoded PIL image to float32 ``[C, size, size]`` in [-1, 1] (module docstring).

    Args:
        image: Any PIL image.
        channels: 1 (grayscale) or 3 (RGB).
        size: Output side length.

    Returns:
        The converted array.
    """
    if channels not in (1, 3):
        raise ValueError(f"models with {channels} input channels are not supported (use 1 or 3)")
    img = image.convert("RGB")
    if channels == 1:
        img = img.convert("L")
    w, h = img.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BILINEAR
        img = img.resize((size, size), resample=resample)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return arr / np.float32(127.5) - np.float32(1.0)


def decode_sample(data: bytes, sample_id: str) -> Image.Image:
    """Decode stored image bytes fully, raising :class:`ImageLoadError` naming the sample."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises a zoo of types for bad data
        raise ImageLoadError(f"sample {sample_id}: image bytes cannot be decoded ({err})") from err
    return img


def load_training_images(
    store: LanceStore,
    dataset: str,
    *,
    channels: int,
    size: int,
    sample_ids: Sequence[str] | None = None,
) -> TrainingImages:
    """Read a dataset's samples from LanceDB and convert them for a model.

    Args:
        store: The workspace's LanceDB tables.
        dataset: Dataset name in the ``samples`` table.
        channels: The model's input channels (1 or 3).
        size: The model's ``sample_size``.
        sample_ids: Only these samples, in this order (e.g. a pruned release's kept ids). None
            means every sample of the dataset, in table (insertion) order.

    Returns:
        :class:`TrainingImages` whose ``sample_ids`` give the row order.

    Raises:
        ImageLoadError: The dataset is empty, a requested id is absent or duplicated, or an
            image cannot be decoded.
    """
    table = store.read("samples", dataset=dataset, columns=["sample_id", "image"])
    ids = table.column("sample_id").to_pylist()
    blobs = table.column("image")
    if sample_ids is None:
        order = list(range(len(ids)))
    else:
        position = {sid: i for i, sid in enumerate(ids)}
        missing = [sid for sid in sample_ids if sid not in position]
        if missing:
            raise ImageLoadError(
                f"{len(missing)} requested sample ids are not in dataset {dataset!r}: {missing[:5]}"
            )
        if len(set(sample_ids)) != len(sample_ids):
            raise ImageLoadError("requested sample ids contain duplicates")
        order = [position[sid] for sid in sample_ids]
    if not order:
        raise ImageLoadError(f"dataset {dataset!r} has no samples in {store.uri}")
    pixels = np.empty((len(order), channels, size, size), dtype=np.float32)
    for row, i in enumerate(order):
        img = decode_sample(blobs[i].as_py(), ids[i])
        pixels[row] = prepare_image(img, channels, size)
    return TrainingImages(pixels=torch.from_numpy(pixels), sample_ids=[ids[i] for i in order])


def images_for_unet(
    store: LanceStore, dataset: str, unet: UNet, sample_ids: Sequence[str] | None = None
) -> TrainingImages:
    """:func:`load_training_images` with channels and size taken from a diffusers UNet config.

    For latent-diffusion models the UNet works on latents, so pass the VAE's
    ``in_channels``/``sample_size`` to :func:`load_training_images` instead.
    """
    size = unet.config.sample_size
    if not isinstance(size, int):
        raise ValueError(f"non-square sample_size {size} is not supported")
    return load_training_images(
        store, dataset, channels=int(unet.config.in_channels), size=size, sample_ids=sample_ids
    )
