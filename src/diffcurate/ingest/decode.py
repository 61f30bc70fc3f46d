"""Safe image decoding and content hashing.

Every image is decoded fully once (``Image.load``) because a truncated file often parses its
header fine and only fails on the pixels; a sample that cannot be decoded now would crash a
training job later. The pixel budget is checked from the header *before* decoding, so a
decompression bomb costs a few bytes of reading, not gigabytes of memory.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
from PIL import Image, UnidentifiedImageError

from diffcurate.storage.reasons import Reason

# We enforce our own, configurable pixel budget before decoding; PIL's global guard would
# otherwise fire first with a different threshold.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """A successfully decoded image with its content hashes.

    ``image`` is ``None`` when decoded in another process: the pixels are only needed again for
    embeddings, and shipping them back would cost more than decoding them anew.
    """

    image: Image.Image | None  # RGB, fully loaded
    width: int
    height: int
    format: str
    sha256: str
    phash: str  # 64-bit DCT perceptual hash, 16 hex digits


@dataclass(frozen=True)
class DecodeFailure:
    reason: Reason
    detail: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DecodeResult = DecodedImage | DecodeFailure


def decode_image(
    data: bytes, *, max_pixels: int, keep_image: bool = True
) -> DecodedImage | DecodeFailure:
    """Decode encoded image bytes, refusing empty, non-image, bomb and corrupt inputs.

    Args:
        data: The encoded file contents.
        max_pixels: Largest width × height accepted, checked from the header before decoding.
        keep_image: Keep the decoded RGB pixels in the result (False: ``image`` is ``None``).

    Returns:
        A :class:`DecodedImage`, or a :class:`DecodeFailure` naming the reason.
    """
    if len(data) == 0:
        return DecodeFailure(Reason.EMPTY_FILE, "image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return DecodeFailure(Reason.NOT_AN_IMAGE, "not a recognised image format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return DecodeFailure(Reason.DECOMPRESSION_BOMB, str(err))
    except Exception as err:  # malformed headers raise a zoo of exception types
        return DecodeFailure(Reason.CORRUPT_IMAGE, f"unreadable image header: {err}")

    width, height = img.size
    if width * height > max_pixels:
        return DecodeFailure(
            Reason.DECOMPRESSION_BOMB,
            f"header declares {width}x{height} = {width * height} pixels, over the "
            f"max_pixels limit of {max_pixels}",
        )
    fmt = img.format or "UNKNOWN"
    try:
        img.load()
        rgb = img.convert("RGB")
    except Exception as err:  # truncated streams: OSError, SyntaxError, zlib.error, ...
        return DecodeFailure(Reason.CORRUPT_IMAGE, f"image data cannot be decoded: {err}")
    return DecodedImage(
        image=rgb if keep_image else None,
        width=width,
        height=height,
        format=fmt,
        sha256=sha256_hex(data),
        phash=str(imagehash.phash(rgb)),
    )


def decode_many(
    images: Sequence[bytes | None], max_pixels: int, keep_image: bool = False
) -> list[DecodeResult | None]:
    """:func:`decode_image` over a chunk (``None`` in, ``None`` out): the unit a worker process
    or a Dask task runs, so that each call ships many images, not one."""
    return [
        None if data is None else decode_image(data, max_pixels=max_pixels, keep_image=keep_image)
        for data in images
    ]
