import hashlib

import imagehash
import numpy as np
import pytest
from PIL import Image

from diffcurate.ingest.decode import DecodedImage, DecodeFailure, decode_image
from diffcurate.storage.reasons import Reason
from imagebytes import jpeg_bytes, png_bomb_bytes, png_bytes

MAX = 50_000_000


@pytest.fixture
def photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:96, :80])


def test_valid_jpeg_decodes_with_exact_hashes(photo):
    data = jpeg_bytes(photo)
    out = decode_image(data, max_pixels=MAX)
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height, out.format) == (80, 96, "JPEG")
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.phash == str(imagehash.phash(out.image))
    assert out.image.mode == "RGB"


def test_png_roundtrip_keeps_pixels_and_same_pixels_share_phash(photo):
    a = decode_image(png_bytes(photo), max_pixels=MAX)
    b = decode_image(png_bytes(photo.copy()), max_pixels=MAX)
    assert isinstance(a, DecodedImage) and isinstance(b, DecodedImage)
    np.testing.assert_array_equal(np.asarray(a.image), photo)
    assert a.phash == b.phash


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_FILE),
        (b"this is a caption, not a JPEG", Reason.NOT_AN_IMAGE),
        (png_bomb_bytes(), Reason.DECOMPRESSION_BOMB),
    ],
    ids=["zero-byte", "not-an-image", "bomb"],
)
def test_bad_bytes_are_refused_with_reason(data, reason):
    out = decode_image(data, max_pixels=MAX)
    assert isinstance(out, DecodeFailure)
    assert out.reason == reason
    assert out.detail


@pytest.mark.parametrize("encode", [jpeg_bytes, png_bytes], ids=["jpeg", "png"])
def test_truncated_image_is_corrupt(photo, encode):
    data = encode(photo)
    out = decode_image(data[: len(data) // 2], max_pixels=MAX)
    assert isinstance(out, DecodeFailure)
    assert out.reason == Reason.CORRUPT_IMAGE


def test_bomb_is_refused_before_decoding_from_header_only():
    # 1e10 declared pixels would need 10 GB to decode; refusing costs no allocation.
    out = decode_image(png_bomb_bytes(), max_pixels=MAX)
    assert isinstance(out, DecodeFailure)
    assert "100000x100000" in out.detail


def test_pixel_limit_is_the_configured_one(photo):
    data = png_bytes(photo)  # 96 * 80 = 7680 pixels
    assert isinstance(decode_image(data, max_pixels=7680), DecodedImage)
    out = decode_image(data, max_pixels=7679)
    assert isinstance(out, DecodeFailure) and out.reason == Reason.DECOMPRESSION_BOMB


def test_grayscale_and_palette_images_become_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode_image(png_bytes(gray), max_pixels=MAX)
    assert isinstance(out, DecodedImage) and out.image.mode == "RGB"
    pal = Image.fromarray(gray).convert("P")
    import io

    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), max_pixels=MAX)
    assert isinstance(out, DecodedImage)
    np.testing.assert_array_equal(np.asarray(out.image)[..., 0], np.asarray(pal.convert("L")))
