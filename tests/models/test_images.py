import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from diffcurate.models.images import (
    ImageLoadError,
    images_for_unet,
    load_training_images,
    prepare_image,
)
from diffcurate.models.reference import reference_model
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.schemas import SAMPLES
from imagebytes import jpeg_bytes, png_bytes


def _rows(dataset: str, items: list[tuple[str, bytes]]) -> pa.Table:
    n = len(items)
    now = datetime.now(UTC)
    return pa.table(
        {
            "sample_id": [sid for sid, _ in items],
            "dataset": [dataset] * n,
            "key": [sid for sid, _ in items],
            "source": ["test"] * n,
            "image": [data for _, data in items],
            "image_format": ["PNG"] * n,
            "width": [8] * n,
            "height": [8] * n,
            "sha256": ["0"] * n,
            "phash": ["0"] * n,
            "caption": ["c"] * n,
            "metadata": ["{}"] * n,
            "embedding_model": [None] * n,
            "image_embedding": [None] * n,
            "text_embedding": [None] * n,
            "ingest_run_id": ["r"] * n,
            "ingested_at": [now] * n,
        },
        schema=SAMPLES,
    )


@pytest.fixture
def digit_store(workspace, digit_files):
    store = LanceStore(str(workspace / "lancedb"))
    # Insert in a scrambled key order so "order preserved" is not accidentally sorted order.
    files = digit_files[:20]
    order = [7, 3, 19, 0, 12, 5, 1, 18, 9, 2, 4, 6, 8, 10, 11, 13, 14, 15, 16, 17]
    store.insert_new("samples", _rows("digits", [(files[i].key, files[i].image) for i in order]))
    store.insert_new("samples", _rows("other", [("x-1", files[0].image)]))
    return store, [files[i].key for i in order]


def test_known_digit_pixels_scaled_to_unit_range(digit_store):
    store, ids = digit_store
    loaded = load_training_images(store, "digits", channels=1, size=8)
    assert loaded.sample_ids == ids
    assert loaded.pixels.shape == (20, 1, 8, 8) and str(loaded.pixels.dtype) == "torch.float32"
    raw = load_digits().images  # 0..16; the corpus stores round(v * 255/16) as 8-bit PNG
    for row, sid in enumerate(ids):
        expected = np.round(raw[int(sid)] * (255.0 / 16.0)) / 127.5 - 1.0
        np.testing.assert_allclose(loaded.pixels[row, 0].numpy(), expected, atol=1e-6)
    assert loaded.pixels.min() == -1.0 and loaded.pixels.max() == 1.0


def test_requested_ids_come_back_in_requested_order(digit_store):
    store, ids = digit_store
    want = [ids[4], ids[0], ids[11]]
    loaded = load_training_images(store, "digits", channels=1, size=8, sample_ids=want)
    full = load_training_images(store, "digits", channels=1, size=8)
    assert loaded.sample_ids == want
    for row, sid in enumerate(want):
        assert np.array_equal(loaded.pixels[row], full.pixels[ids.index(sid)])


def test_missing_and_empty_are_clear_errors(digit_store):
    store, ids = digit_store
    with pytest.raises(ImageLoadError, match=r"not in dataset 'digits'.*nope"):
        load_training_images(store, "digits", channels=1, size=8, sample_ids=[ids[0], "nope"])
    with pytest.raises(ImageLoadError, match="duplicates"):
        load_training_images(store, "digits", channels=1, size=8, sample_ids=[ids[0], ids[0]])
    with pytest.raises(ImageLoadError, match="has no samples"):
        load_training_images(store, "empty", channels=1, size=8)


def test_undecodable_bytes_name_the_sample(workspace, digit_files):
    store = LanceStore(str(workspace / "lancedb"))
    store.insert_new("samples", _rows("bad", [("ok", digit_files[0].image), ("broken", b"xx")]))
    with pytest.raises(ImageLoadError, match="sample broken"):
        load_training_images(store, "bad", channels=1, size=8)


def test_images_for_unet_uses_model_channels_and_size(digit_store):
    store, ids = digit_store
    loaded = images_for_unet(store, "digits", reference_model("tiny").unet)
    assert loaded.pixels.shape == (20, 1, 8, 8) and loaded.sample_ids == ids


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_grayscale_and_area_resize_match_pil():
    img = _photo(32, 32)
    out = prepare_image(img, channels=1, size=8)
    ref = np.asarray(img.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    np.testing.assert_allclose(out[0], ref / 127.5 - 1, atol=1e-6)
    # BOX is the 4x4 block mean here, up to PIL's fixed-point rounding (one 8-bit level).
    gray = np.asarray(img.convert("L"), dtype=np.float64)
    block_mean = gray.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.abs((out[0] + 1) * 127.5 - block_mean).max() <= 1.0


def test_rgb_center_crop_and_upscale_match_pil():
    img = _photo(12, 6)  # wide: the centered 6x6 square is columns 3..8
    out = prepare_image(img, channels=3, size=8)
    assert out.shape == (3, 8, 8)
    ref = img.crop((3, 0, 9, 6)).resize((8, 8), Image.Resampling.BILINEAR)
    expected = np.asarray(ref, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_gray_png_to_rgb_model_and_rgba_drop_alpha():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    img = Image.open(io.BytesIO(png_bytes(gray)))
    out = prepare_image(img, channels=3, size=8)
    for c in range(3):
        np.testing.assert_allclose(out[c], gray / 127.5 - 1, atol=1e-6)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, red stays
    out = prepare_image(Image.fromarray(rgba), channels=3, size=8)
    assert np.allclose(out[0], 200 / 127.5 - 1) and np.allclose(out[1:], -1)


def test_jpeg_rgb_to_gray_uses_luma():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 255  # pure green
    img = Image.open(io.BytesIO(jpeg_bytes(rgb, quality=100)))
    expected = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32) / 127.5 - 1
    out = prepare_image(img, channels=1, size=8)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert abs((out[0].mean() + 1) * 127.5 - 0.587 * 255) < 3  # ITU-R 601 green weight
