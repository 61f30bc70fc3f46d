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
from dataclasses import dataclass

import imagehash
from PIL import Image, UnidentifiedImageError

from diffcurate.storage.reasons import Reason

# We enforce our own, configurable pixel budget before decoding; PIL's global guard would
# otherwise fire first with a different threshold.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    """A successfully decoded image with its content hashes."""

    image: Image.Image  # RGB, fully loaded
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


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage | DecodeFailure:
    """Decode encoded image bytes, refusing empty, non-image, bomb and corrupt inputs.

    Args:
        data: The encoded file contents.
        max_pixels: Largest width × height accepted, checked from the header before decoding.

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
        image=rgb,
        width=width,
        height=height,
        format=fmt,
        sha256=sha256_hex(data),
        phash=str(imagehash.phash(rgb)),
    )
