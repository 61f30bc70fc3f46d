"""Turn ingested samples into the pixel tensor a diffusion model (or its VAE) consumes.

Conversion of one image, in this order (the same for training, scoring and gating, so a model
never sees pixels prepared differently from the ones it was trained on):

1. Decode the stored bytes with PIL and convert to RGB (alpha dropped), exactly as ingestion
   did when it hashed the image; for 1-channel models convert that to 8-bit luma ``L``
   (ITU-R 601-2: ``L = 0.299 R + 0.587 G + 0.114 B``, exact for gray inputs).
2. Fit it to the model's square ``size`` by the geometry policy (:data:`Geometry`):

   * ``center-crop`` (default): cut the largest centred square (offsets rounded down), then
     resize it. Aspect is kept, but a non-square image loses its sides (a 1.6:1 image loses
     37.5% of its area).
   * ``resize``: squash the whole image to the square. Nothing is lost, aspect is not kept.
   * ``pad``: letterbox. Scale so the long side is ``size`` (short side rounded half up, at
     least 1 pixel), then centre it on a square canvas of fill value **0.0** (mid-gray, 127.5
     of 255; odd margins put the extra row/column at the bottom/right). Why a constant and not
     edge reflection: reflection copies image content into the border, which a memorization or
     attribution score would then count twice; 0.0 adds no content and is the centre of the
     [-1, 1] range, the value a VAE and the noise process treat as neutral.

   Resampling: ``BOX`` (area averaging) when no axis is enlarged, because it averages every
   source pixel into the output and so does not alias fine strokes; ``BILINEAR`` when an axis
   is enlarged, where area averaging would just replicate pixels into blocks. An image already
   at the target size is not resampled at all.
3. Scale 8-bit values to [-1, 1]: ``x / 127.5 - 1`` (0 → -1, 255 → 1), float32.

What each policy did to an image (:class:`ImageFacts`: cropped and how much area was lost,
upscaled, squashed, padded) is summarised per load in a :class:`GeometryReport`, whose
:meth:`GeometryReport.warning` speaks up when more than a threshold share of images (default
5%) was cropped or upscaled: neither may happen silently.

Reading is bounded: sample metadata (ids, captions, sizes) is read once, image bytes in chunks
of :data:`READ_ROWS` rows.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from diffcurate.models.diffusion import UNet

log = logging.getLogger(__name__)


class SampleStore(Protocol):
    """What loading images needs of the workspace tables; ``storage.LanceStore`` provides it.

    A protocol rather than an import: models sit beside storage in the layering, and only the
    layers above (tasks, flows, CLI) join the two by passing a store in.
    """

    @property
    def uri(self) -> str: ...
    def read(
        self,
        name: str,
        dataset: str | None = None,
        columns: list[str] | None = None,
        where: dict[str, str | Sequence[str]] | None = None,
    ) -> pa.Table: ...


Geometry = Literal["center-crop", "resize", "pad"]
"""How a non-square image is fitted to the model's square input (module docstring)."""

GEOMETRIES: tuple[str, ...] = get_args(Geometry)

PAD_FILL = 0.0
"""Value of letterbox margins in [-1, 1] (mid-gray): see the module docstring for why."""

WARN_SHARE = 0.05
"""Default share of cropped or upscaled images above which a load warns."""

READ_ROWS = 256
"""Image blobs read from LanceDB per query (bounds memory to this many encoded images)."""


class ImageLoadError(ValueError):
    """A stored sample cannot be turned into a training image (the message names it)."""


@dataclass(frozen=True)
class ImageFacts:
    """What the geometry policy does to one ``width × height`` image at a target ``size``.

    Attributes:
        width: Source width in pixels.
        height: Source height in pixels.
        cropped: Part of the image was cut away (``center-crop`` of a non-square image).
        area_lost: Share of the source area cut away, in [0, 1).
        upscaled: Some axis was enlarged (interpolated pixels, less detail than the model's
            resolution suggests).
        squashed: The aspect ratio was changed (``resize`` of a non-square image).
        padded: Fill margins were added (``pad`` of a non-square image).
        pad_share: Share of the output that is fill, in [0, 1).
    """

    width: int
    height: int
    cropped: bool
    area_lost: float
    upscaled: bool
    squashed: bool
    padded: bool
    pad_share: float


@dataclass(frozen=True)
class _Plan:
    crop: tuple[int, int, int, int] | None  # PIL box (left, top, right, bottom)
    resize: tuple[int, int]  # (w, h) of the resampled content
    offset: tuple[int, int]  # (left, top) of the content on the size×size canvas
    resample: Image.Resampling | None  # None: content is already at its target size


def _plan(width: int, height: int, size: int, geometry: str) -> _Plan:
    """The crop/resize/paste steps of one image; shared by pixels and facts so they agree."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; expected one of {list(GEOMETRIES)}")
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"image {width}x{height} or target size {size} is empty")
    crop = None
    src_w, src_h = width, height
    if geometry == "center-crop":
        side = min(width, height)
        if (width, height) != (side, side):
            left, top = (width - side) // 2, (height - side) // 2
            crop = (left, top, left + side, top + side)
        src_w = src_h = side
        out_w = out_h = size
    elif geometry == "resize":
        out_w = out_h = size
    else:  # pad
        long = max(width, height)
        out_w = max(1, (width * size + long // 2) // long)
        out_h = max(1, (height * size + long // 2) // long)
    offset = ((size - out_w) // 2, (size - out_h) // 2)
    if (src_w, src_h) == (out_w, out_h):
        resample = None
    elif src_w < out_w or src_h < out_h:
        resample = Image.Resampling.BILINEAR
    else:
        resample = Image.Resampling.BOX
    return _Plan(crop=crop, resize=(out_w, out_h), offset=offset, resample=resample)


def image_facts(
    width: int, height: int, size: int, geometry: Geometry = "center-crop"
) -> ImageFacts:
    """What :func:`prepare_image` does to a ``width × height`` image (no pixels needed).

    Args:
        width: Source width.
        height: Source height.
        size: The model's square input side.
        geometry: The policy.

    Returns:
        The image's :class:`ImageFacts`.
    """
    plan = _plan(width, height, size, geometry)
    kept = width * height
    if plan.crop is not None:
        left, top, right, bottom = plan.crop
        kept = (right - left) * (bottom - top)
    out_w, out_h = plan.resize
    return ImageFacts(
        width=width,
        height=height,
        cropped=plan.crop is not None,
        area_lost=1.0 - kept / (width * height),
        upscaled=plan.resample is Image.Resampling.BILINEAR,
        squashed=geometry == "resize" and width != height,
        padded=(out_w, out_h) != (size, size),
        pad_share=1.0 - (out_w * out_h) / (size * size),
    )


def prepare_image(
    image: Image.Image, channels: int, size: int, geometry: Geometry = "center-crop"
) -> np.ndarray:
    """Convert one decoded PIL image to float32 ``[C, size, size]`` in [-1, 1] (module docstring).

    Args:
        image: Any PIL image.
        channels: 1 (grayscale) or 3 (RGB).
        size: Output side length.
        geometry: How a non-square image is fitted to the square.

    Returns:
        The converted array.
    """
    if channels not in (1, 3):
        raise ValueError(
            f"images with {channels} channels are not supported (use 1 or 3); a UNet with "
            f"{channels} input channels works on VAE latents: load its inputs with "
            "diffcurate.models.inputs.load_inputs"
        )
    img = image.convert("RGB")
    if channels == 1:
        img = img.convert("L")
    plan = _plan(img.width, img.height, size, geometry)
    if plan.crop is not None:
        img = img.crop(plan.crop)
    if plan.resample is not None:
        img = img.resize(plan.resize, resample=plan.resample)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    # C order, not the transpose's channels-last strides: torch would otherwise pick its
    # channels-last conv kernels for a stack of these, whose round-off differs.
    arr = np.ascontiguousarray(arr / np.float32(127.5) - np.float32(1.0))
    if plan.resize == (size, size):
        return arr
    out = np.full((channels, size, size), PAD_FILL, dtype=np.float32)
    (left, top), (w, h) = plan.offset, plan.resize
    out[:, top : top + h, left : left + w] = arr
    return out


class GeometryReport(BaseModel):
    """How many images of a load the geometry policy changed, and by how much.

    Attributes:
        geometry: The policy applied.
        size: The square side images were fitted to.
        n_images: Images loaded.
        cropped: Images that lost area to the crop.
        upscaled: Images enlarged along some axis.
        squashed: Images whose aspect ratio was changed.
        padded: Images given fill margins.
        max_area_lost: Largest share of an image's area cropped away.
        max_pad_share: Largest share of an output that is fill.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    geometry: Geometry
    size: int
    n_images: int
    cropped: int
    upscaled: int
    squashed: int
    padded: int
    max_area_lost: float
    max_pad_share: float

    @classmethod
    def of(cls, facts: Iterable[ImageFacts], geometry: Geometry, size: int) -> GeometryReport:
        """Summarise per-image facts."""
        items = list(facts)
        return cls(
            geometry=geometry,
            size=size,
            n_images=len(items),
            cropped=sum(f.cropped for f in items),
            upscaled=sum(f.upscaled for f in items),
            squashed=sum(f.squashed for f in items),
            padded=sum(f.padded for f in items),
            max_area_lost=max((f.area_lost for f in items), default=0.0),
            max_pad_share=max((f.pad_share for f in items), default=0.0),
        )

    def warning(self, threshold: float = WARN_SHARE) -> str | None:
        """A message when more than ``threshold`` of the images were cropped or upscaled.

        Args:
            threshold: Share of images in [0, 1]; ``0`` warns about any single one.

        Returns:
            The message, or None when both shares are within the threshold.
        """
        if self.n_images == 0:
            return None
        parts = []
        if self.cropped / self.n_images > threshold:
            parts.append(
                f"{self.cropped} of {self.n_images} images were center-cropped to a square "
                f"(up to {100 * self.max_area_lost:.1f}% of an image's area lost; "
                "geometry='pad' or 'resize' keeps all of it)"
            )
        if self.upscaled / self.n_images > threshold:
            parts.append(
                f"{self.upscaled} of {self.n_images} images are smaller than the model's "
                f"{self.size}px input and were upscaled"
            )
        return "; ".join(parts) or None


@dataclass(frozen=True)
class TrainingImages:
    """Images ready for a diffusion model.

    Attributes:
        pixels: float32 ``[N, C, H, W]`` in [-1, 1].
        sample_ids: The sample id of each row of ``pixels``, in the same order.
        geometry: What the geometry policy did to these images.
    """

    pixels: torch.Tensor
    sample_ids: list[str]
    geometry: GeometryReport


def decode_sample(data: bytes, sample_id: str) -> Image.Image:
    """Decode stored image bytes fully, raising :class:`ImageLoadError` naming the sample."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises a zoo of types for bad data
        raise ImageLoadError(f"sample {sample_id}: image bytes cannot be decoded ({err})") from err
    return img


def read_sample_rows(
    store: SampleStore, dataset: str, sample_ids: Sequence[str] | None, columns: Sequence[str]
) -> pa.Table:
    """Small columns of a dataset's samples (never ``image``), in the requested order.

    Args:
        store: The workspace's LanceDB tables.
        dataset: Dataset name in the ``samples`` table.
        sample_ids: Only these samples, in this order; None means every sample of the dataset
            in table (insertion) order.
        columns: Columns to return; ``sample_id`` is always included first.

    Raises:
        ImageLoadError: The selection is empty, or a requested id is absent or duplicated.
    """
    cols = ["sample_id", *(c for c in columns if c != "sample_id")]
    # A shard's few ids are filtered in Lance; a long list costs less as one dataset scan.
    where = None if sample_ids is None or len(sample_ids) > READ_ROWS else {"sample_id": sample_ids}
    table = store.read("samples", dataset=dataset, columns=cols, where=where)
    if sample_ids is not None:
        position = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
        missing = [sid for sid in sample_ids if sid not in position]
        if missing:
            raise ImageLoadError(
                f"{len(missing)} requested sample ids are not in dataset {dataset!r}: {missing[:5]}"
            )
        if len(set(sample_ids)) != len(sample_ids):
            raise ImageLoadError("requested sample ids contain duplicates")
        table = table.take(pa.array([position[sid] for sid in sample_ids], type=pa.int64()))
    if table.num_rows == 0:
        raise ImageLoadError(f"dataset {dataset!r} has no samples in {store.uri}")
    return table


def iter_image_bytes(
    store: SampleStore, dataset: str, sample_ids: Sequence[str], rows_per_read: int = READ_ROWS
) -> Iterator[tuple[str, bytes]]:
    """``(sample_id, image bytes)`` of existing samples, in ``sample_ids`` order, read in chunks.

    Raises:
        ImageLoadError: An id vanished between listing and reading.
    """
    for start in range(0, len(sample_ids), rows_per_read):
        chunk = list(sample_ids[start : start + rows_per_read])
        table = store.read(
            "samples", dataset=dataset, columns=["sample_id", "image"], where={"sample_id": chunk}
        )
        blobs = dict(zip(table.column("sample_id").to_pylist(), table.column("image"), strict=True))
        for sid in chunk:
            if sid not in blobs:
                raise ImageLoadError(f"sample {sid} is no longer in dataset {dataset!r}")
            yield sid, blobs[sid].as_py()


def load_training_images(
    store: SampleStore,
    dataset: str,
    *,
    channels: int,
    size: int,
    sample_ids: Sequence[str] | None = None,
    geometry: Geometry = "center-crop",
) -> TrainingImages:
    """Read a dataset's samples from LanceDB and convert them for a model.

    Args:
        store: The workspace's LanceDB tables.
        dataset: Dataset name in the ``samples`` table.
        channels: The model's input channels (1 or 3).
        size: The model's ``sample_size``.
        sample_ids: Only these samples, in this order (e.g. a pruned release's kept ids). None
            means every sample of the dataset, in table (insertion) order.
        geometry: How non-square images are fitted (module docstring).

    Returns:
        :class:`TrainingImages` whose ``sample_ids`` give the row order. A geometry warning
        (:meth:`GeometryReport.warning`) is also logged.

    Raises:
        ImageLoadError: The dataset is empty, a requested id is absent or duplicated, or an
            image cannot be decoded.
    """
    ids = read_sample_rows(store, dataset, sample_ids, []).column("sample_id").to_pylist()
    pixels = np.empty((len(ids), channels, size, size), dtype=np.float32)
    facts = []
    for row, (sid, data) in enumerate(iter_image_bytes(store, dataset, ids)):
        img = decode_sample(data, sid)
        pixels[row] = prepare_image(img, channels, size, geometry)
        facts.append(image_facts(img.width, img.height, size, geometry))
    report = GeometryReport.of(facts, geometry, size)
    if (message := report.warning()) is not None:
        log.warning("dataset %r: %s", dataset, message)
    return TrainingImages(pixels=torch.from_numpy(pixels), sample_ids=ids, geometry=report)


def images_for_unet(
    store: SampleStore,
    dataset: str,
    unet: UNet,
    sample_ids: Sequence[str] | None = None,
    geometry: Geometry = "center-crop",
) -> TrainingImages:
    """:func:`load_training_images` with channels and size taken from a pixel-space UNet.

    A latent-diffusion UNet works on VAE latents, not pixels: use
    :func:`diffcurate.models.inputs.load_inputs` for any model that may have a VAE.
    """
    size = unet.config.sample_size
    if not isinstance(size, int):
        raise ValueError(f"non-square sample_size {size} is not supported")
    channels = int(unet.config.in_channels)
    if channels not in (1, 3):
        raise ValueError(
            f"this UNet takes {channels}-channel inputs, which are VAE latents rather than "
            "pixels: load them with diffcurate.models.inputs.load_inputs"
        )
    return load_training_images(
        store, dataset, channels=channels, size=size, sample_ids=sample_ids, geometry=geometry
    )
