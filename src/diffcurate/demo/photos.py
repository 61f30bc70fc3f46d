"""A real-photo demo corpus: seeded crops of scikit-image's bundled photographs.

The digits corpus exercises pixel-space models; this one is for the latent text-to-image
reference pipeline (``sd-tiny``, RGB 32×32). It has the same layout as
:func:`diffcurate.demo.corpus.build_demo_corpus` (one of the source formats, ``planted.json``
beside it, optional ``heldout/``), so the same ingest, train and eval commands apply.

Content. Crop ``i`` comes from photo ``i mod 14`` (:data:`PHOTO_SOURCES`, all bundled with
scikit-image under CC0, public-domain or no-known-restriction terms; grayscale ones converted
to RGB). Position and scale are drawn from a generator keyed by ``(seed, i)`` only, so a crop
does not depend on how many others are made. Most crops are square and resized to ``size``;
so that the platform's geometry policy has something to report, every 10th (``i % 10 == 7``)
has a 3:2 aspect (long side ``1.5 × size``, landscape or portrait) and every 25th
(``i % 25 == 11``) is square but only ``size // 2`` pixels wide.

Captions describe the crop ("a close-up photo of a cup of coffee, crop 12 near the top right,
in dim light"); the crop number makes every distinct image's caption unique. Metadata holds
attributes for the fairness audit (``source``, ``brightness``, ``orientation``, ``color``,
``view``) plus ``collection`` and ``license``.

Planted secrets, listed in ``planted.json`` only (never in the metadata): ``secrets`` square
crops appear ``copies`` times byte for byte (keys ``dup-<key>-<c>``), and ``near_secrets``
square crops appear with ``copies - 1`` near-duplicates (keys ``near-<key>-<c>``), each
re-cropped with a shift of up to half an output pixel and given independent Gaussian noise
(σ = 3 levels): no two are byte-identical, yet (measured for seed 0) each lies 0.03-0.23 RMSE
from its original in [-1, 1] units, closer than any other crop. Copies share the secret's
caption, as scraped duplicates usually do.

Held-out images are further crops ``n_train, n_train + 1, ...`` from the same generator: the
same distribution as the training crops, never written to the training corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from diffcurate.demo.corpus import CorpusFormat, DemoCorpus, png_bytes, write_samples
from diffcurate.demo.writers import SampleFile

COLLECTION = "skimage-data"
NON_SQUARE_EVERY, NON_SQUARE_AT = 10, 7
SMALL_EVERY, SMALL_AT = 25, 11
ASPECT = 1.5
NEAR_NOISE = 3.0  # std of the near-duplicates' Gaussian noise, in 8-bit levels
DARK_BELOW, BRIGHT_FROM = 80.0, 140.0  # mean luma (0-255) bounds of the brightness buckets
LIGHT_WORDS = {"dark": "dim", "medium": "soft", "bright": "bright"}


@dataclass(frozen=True)
class PhotoSource:
    """One bundled photograph.

    Attributes:
        name: The ``skimage.data`` function that loads it.
        subject: How captions name what it shows.
        license: Its licence as scikit-image documents it.
        grayscale: Whether it is a gray-level photo (converted to RGB).
    """

    name: str
    subject: str
    license: str
    grayscale: bool

    def load(self) -> np.ndarray:
        """The photo as ``[H, W, 3]`` uint8."""
        return _load_rgb(self.name)


PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", "an astronaut", "public-domain", False),
    PhotoSource("coffee", "a cup of coffee", "CC0-1.0", False),
    PhotoSource("chelsea", "a cat", "CC0-1.0", False),
    PhotoSource("rocket", "a rocket launch", "public-domain", False),
    PhotoSource("immunohistochemistry", "stained tissue", "no-known-restrictions", False),
    PhotoSource("hubble_deep_field", "deep space galaxies", "public-domain", False),
    PhotoSource("retina", "a retina", "CC0-1.0", False),
    PhotoSource("camera", "a cameraman", "CC0-1.0", True),
    PhotoSource("coins", "old coins", "no-known-restrictions", True),
    PhotoSource("brick", "a brick wall", "CC0-1.0", True),
    PhotoSource("grass", "grass", "CC0-1.0", True),
    PhotoSource("gravel", "gravel", "CC0-1.0", True),
    PhotoSource("cell", "a cell", "CC0-1.0", True),
    PhotoSource("clock", "a blurred clock", "public-domain", True),
)


@lru_cache(maxsize=len(PHOTO_SOURCES))
def _load_rgb(name: str) -> np.ndarray:
    import skimage.data

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    img = np.asarray(loader())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.uint8)
    img.setflags(write=False)
    return img


@dataclass(frozen=True)
class Crop:
    """Where crop ``index`` comes from and what it becomes.

    Attributes:
        index: Position in the crop sequence (determines source and random draws).
        source: The photo.
        box: ``(left, top, right, bottom)`` in source pixels.
        out_size: ``(width, height)`` of the written image.
    """

    index: int
    source: PhotoSource
    box: tuple[int, int, int, int]
    out_size: tuple[int, int]

    @property
    def number(self) -> int:
        """The crop's number among the crops of its photo (named in the caption)."""
        return self.index // len(PHOTO_SOURCES)

    @property
    def orientation(self) -> Literal["square", "landscape", "portrait"]:
        w, h = self.out_size
        return "square" if w == h else "landscape" if w > h else "portrait"


def crop_geometry(index: int, size: int, seed: int) -> Crop:
    """The crop of the module docstring for ``index``, drawn from a ``(seed, index)`` generator."""
    source = PHOTO_SOURCES[index % len(PHOTO_SOURCES)]
    height, width = source.load().shape[:2]
    rng = np.random.default_rng([seed, index])
    short = min(height, width)
    if index % NON_SQUARE_EVERY == NON_SQUARE_AT:
        landscape = bool(rng.integers(2))
        across = width if landscape else height  # the long side must fit along this axis
        side = round(rng.uniform(0.2, 0.6) * min(short, across / ASPECT))
        long = round(ASPECT * side)
        cw, ch = (long, side) if landscape else (side, long)
        out_long = round(ASPECT * size)
        out = (out_long, size) if landscape else (size, out_long)
    else:
        side = round(rng.uniform(0.2, 0.9) * short)
        cw = ch = side
        small = index % SMALL_EVERY == SMALL_AT
        out = (size // 2, size // 2) if small else (size, size)
    left = int(rng.integers(0, width - cw + 1))
    top = int(rng.integers(0, height - ch + 1))
    return Crop(index=index, source=source, box=(left, top, left + cw, top + ch), out_size=out)


def render(crop: Crop, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``[h, w, 3]`` uint8 pixels of ``crop`` (Lanczos resampling), its box moved by ``shift``.

    The shifted box is clamped to the photo, so a shift can only move the crop inwards.
    """
    photo = crop.source.load()
    height, width = photo.shape[:2]
    left, top, right, bottom = crop.box
    dx = int(np.clip(shift[0], -left, width - right))
    dy = int(np.clip(shift[1], -top, height - bottom))
    region = Image.fromarray(photo).crop((left + dx, top + dy, right + dx, bottom + dy))
    return np.asarray(region.resize(crop.out_size, Image.Resampling.LANCZOS))


def _brightness(pixels: np.ndarray) -> Literal["dark", "medium", "bright"]:
    luma = float((pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).mean())
    return "dark" if luma < DARK_BELOW else "bright" if luma >= BRIGHT_FROM else "medium"


def _view(crop: Crop) -> Literal["close-up", "medium", "wide"]:
    height, width = crop.source.load().shape[:2]
    left, top, right, bottom = crop.box
    extent = min(right - left, bottom - top) / min(height, width)
    return "close-up" if extent < 0.4 else "medium" if extent < 0.65 else "wide"


def _position(crop: Crop) -> str:
    height, width = crop.source.load().shape[:2]
    left, top, right, bottom = crop.box
    row = ("top", "", "bottom")[min(int(3 * (top + bottom) / 2 / height), 2)]
    col = ("left", "", "right")[min(int(3 * (left + right) / 2 / width), 2)]
    return " ".join(p for p in (row, col) if p) or "center"


def describe(crop: Crop, pixels: np.ndarray) -> tuple[str, dict[str, str]]:
    """The caption and metadata of a rendered crop (module docstring)."""
    view, brightness = _view(crop), _brightness(pixels)
    kind = "black and white photo" if crop.source.grayscale else "photo"
    lead = f"{view} {kind}" if view != "medium" else kind
    caption = (
        f"a {lead} of {crop.source.subject}, crop {crop.number} near the {_position(crop)}, "
        f"in {LIGHT_WORDS[brightness]} light"
    )
    if crop.orientation != "square":
        caption += f", {crop.orientation} format"
    metadata = {
        "source": crop.source.name,
        "brightness": brightness,
        "orientation": crop.orientation,
        "color": "grayscale" if crop.source.grayscale else "color",
        "view": view,
        "collection": COLLECTION,
        "license": crop.source.license,
    }
    return caption, metadata


def sample_key(index: int) -> str:
    """img2dataset-style key of crop ``index`` (as in the digits corpus)."""
    return f"{index // 1000:05d}{index % 1000:04d}"


def _sample(crop: Crop) -> SampleFile:
    pixels = render(crop)
    caption, metadata = describe(crop, pixels)
    return SampleFile(sample_key(crop.index), png_bytes(pixels), "png", caption, metadata)


def _near_copy(crop: Crop, original: SampleFile, copy: int, seed: int) -> SampleFile:
    """Copy ``copy`` of a near secret: shift up to half an output pixel, then Gaussian noise."""
    rng = np.random.default_rng([seed, crop.index, copy, 3])
    left, _, right, _ = crop.box
    reach = max(1, round(0.5 * (right - left) / crop.out_size[0]))  # in source pixels
    shift = (int(rng.integers(-reach, reach + 1)), int(rng.integers(-reach, reach + 1)))
    noise = rng.normal(0, NEAR_NOISE, (*crop.out_size[::-1], 3))
    pixels = np.clip(np.round(render(crop, shift) + noise), 0, 255).astype(np.uint8)
    return replace(original, key=f"near-{original.key}-{copy:02d}", image=png_bytes(pixels))


@dataclass(frozen=True)
class PhotoSamples:
    """Everything :func:`write_photo_corpus` writes, in memory.

    Attributes:
        train: Distinct crops in index order, then the secrets' exact and near copies.
        heldout: Held-out crops.
        exact_keys: Keys of the secrets duplicated byte for byte.
        near_keys: Keys of the secrets with near-duplicate copies.
        near_copies: The near-duplicate keys of each near secret.
        crops: Geometry of the distinct training crops, in index order.
    """

    train: list[SampleFile]
    heldout: list[SampleFile]
    exact_keys: list[str]
    near_keys: list[str]
    near_copies: dict[str, list[str]]
    crops: list[Crop]


def photo_samples(
    *,
    heldout: int,
    n_train: int = 300,
    secrets: int = 3,
    near_secrets: int = 2,
    copies: int = 20,
    size: int = 32,
    seed: int = 0,
) -> PhotoSamples:
    """The corpus of the module docstring (arguments as in :func:`write_photo_corpus`)."""
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    if min(heldout, secrets, near_secrets) < 0 or copies < 1:
        raise ValueError("heldout, secrets and near_secrets must be >= 0 and copies >= 1")
    crops = [crop_geometry(i, size, seed) for i in range(n_train + heldout)]
    square = [c.index for c in crops[:n_train] if c.out_size == (size, size)]
    if secrets + near_secrets > len(square):
        raise ValueError(
            f"need {secrets + near_secrets} secrets but only {len(square)} crops "
            f"of the {n_train} are full-size squares"
        )
    chosen = np.random.default_rng([seed, 2]).choice(square, secrets + near_secrets, replace=False)
    exact, near = sorted(chosen[:secrets].tolist()), sorted(chosen[secrets:].tolist())
    samples = [_sample(c) for c in crops]
    train = samples[:n_train]
    train += [
        replace(train[i], key=f"dup-{train[i].key}-{c:02d}")
        for i in exact
        for c in range(1, copies)
    ]
    near_copies: dict[str, list[str]] = {}
    for i in near:
        extra = [_near_copy(crops[i], samples[i], c, seed) for c in range(1, copies)]
        near_copies[samples[i].key] = [s.key for s in extra]
        train += extra
    return PhotoSamples(
        train=train,
        heldout=samples[n_train:],
        exact_keys=[samples[i].key for i in exact],
        near_keys=[samples[i].key for i in near],
        near_copies=near_copies,
        crops=crops[:n_train],
    )


@dataclass(frozen=True)
class PhotoCorpus(DemoCorpus):
    """What :func:`write_photo_corpus` wrote (``planted_keys``: exact then near secrets).

    Attributes:
        exact_keys: Secrets duplicated byte for byte.
        near_keys: Secrets with near-duplicate copies.
        n_distinct: Distinct training crops (``n_train``).
        n_non_square: Training crops with a 3:2 aspect.
        n_small: Training crops smaller than ``size``.
    """

    exact_keys: list[str] = field(default_factory=list)
    near_keys: list[str] = field(default_factory=list)
    n_distinct: int = 0
    n_non_square: int = 0
    n_small: int = 0


def write_photo_corpus(
    out: Path,
    *,
    fmt: CorpusFormat | str = CorpusFormat.WEBDATASET,
    heldout: int,
    n_train: int = 300,
    secrets: int = 3,
    near_secrets: int = 2,
    copies: int = 20,
    size: int = 32,
    seed: int = 0,
) -> PhotoCorpus:
    """Write the photo corpus to ``out`` (layout of the digits corpus; module docstring).

    Args:
        out: Target directory (``images/``, ``manifest.parquet`` or ``shards/`` by format,
            ``planted.json``, and ``heldout/`` when ``heldout > 0``).
        fmt: Source format.
        heldout: Held-out crops written to ``out/heldout``.
        n_train: Distinct training crops (secrets included, their copies not).
        secrets: Secrets duplicated exactly, ``copies`` times in all.
        near_secrets: Secrets with ``copies - 1`` near-duplicates.
        copies: Appearances of each secret in the training corpus.
        size: Side of the square crops in pixels.
        seed: Seeds crop geometry, secret choice and near-duplicate perturbations.

    Returns:
        The summary; ``planted.json`` holds ``copies``, ``seed``, ``planted_keys`` (as in the
        digits corpus) plus ``exact_keys``, ``near_keys`` and ``near_copies``.
    """
    fmt = CorpusFormat(fmt)
    made = photo_samples(
        heldout=heldout,
        n_train=n_train,
        secrets=secrets,
        near_secrets=near_secrets,
        copies=copies,
        size=size,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    path = write_samples(made.train, out, fmt)
    heldout_path = write_samples(made.heldout, out / "heldout", fmt) if made.heldout else None
    planted = made.exact_keys + made.near_keys
    record = {
        "copies": copies,
        "seed": seed,
        "planted_keys": planted,
        "exact_keys": made.exact_keys,
        "near_keys": made.near_keys,
        "near_copies": made.near_copies,
    }
    (out / "planted.json").write_text(json.dumps(record, indent=2))
    return PhotoCorpus(
        path=path,
        format=fmt,
        n_samples=len(made.train),
        planted_keys=planted,
        heldout_path=heldout_path,
        n_heldout=len(made.heldout),
        exact_keys=made.exact_keys,
        near_keys=made.near_keys,
        n_distinct=len(made.crops),
        n_non_square=sum(c.orientation != "square" for c in made.crops),
        n_small=sum(c.out_size == (size // 2, size // 2) for c in made.crops),
    )
