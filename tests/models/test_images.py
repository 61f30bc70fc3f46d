import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import diffcurate.models.images as images_module
from diffcurate.models.images import (
    GeometryReport,
    ImageLoadError,
    image_facts,
    images_for_unet,
    iter_image_bytes,
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


# ------------------------------------------------------------------------- geometry policies
def _legacy_prepare(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """prepare_image as it was before geometry policies: center-crop must stay bit-identical."""
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


def _unit(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


WIDE = np.array([[10, 30, 50, 70], [90, 110, 130, 150]], dtype=np.uint8)  # 4 wide, 2 high


def test_center_crop_is_bit_identical_to_before():
    for w, h in [(12, 6), (6, 12), (7, 3), (32, 32), (5, 5), (9, 8), (64, 20), (3, 40)]:
        img = _photo(w, h)
        for channels in (1, 3):
            for size in (4, 8, 16):
                assert np.array_equal(
                    prepare_image(img, channels, size), _legacy_prepare(img, channels, size)
                ), (w, h, channels, size)
                assert np.array_equal(
                    prepare_image(img, channels, size, "center-crop"),
                    prepare_image(img, channels, size),
                )


def test_pinned_pixels_of_each_policy_on_a_wide_image():
    img = Image.fromarray(WIDE)
    # center-crop: the centred 2x2 square is columns 1..2, already at size: no resampling.
    crop = prepare_image(img, 1, 2, "center-crop")
    assert np.array_equal(crop[0], _unit([[30, 50], [110, 130]]))
    # resize: BOX squashes 4 -> 2 columns, each output the mean of two neighbours.
    squash = prepare_image(img, 1, 2, "resize")
    assert np.array_equal(squash[0], _unit([[20, 60], [100, 140]]))
    # pad at size 4: the long side already fits, the 2 rows are centred, margins are 0.0.
    pad = prepare_image(img, 1, 4, "pad")
    assert np.array_equal(pad[0, 1:3], _unit(WIDE)) and np.all(pad[0, [0, 3]] == 0.0)
    # pad at size 2: BOX to 2x1 (means of the 2x2 blocks), the odd margin row at the bottom.
    small = prepare_image(img, 1, 2, "pad")
    assert np.array_equal(small[0, 0], _unit([60, 100])) and np.all(small[0, 1] == 0.0)


def test_pinned_pixels_when_upscaling():
    tiny = Image.fromarray(np.array([[10, 30]], dtype=np.uint8))  # 2 wide, 1 high
    # center-crop keeps column 0 only and BILINEAR-enlarges the single pixel.
    assert np.array_equal(prepare_image(tiny, 1, 2, "center-crop")[0], _unit([[10, 10]] * 2))
    # resize enlarges the height only: one source row is repeated.
    assert np.array_equal(prepare_image(tiny, 1, 2, "resize")[0], _unit([[10, 30]] * 2))
    pad = prepare_image(tiny, 3, 2, "pad")  # RGB: every channel gets the same fill
    assert np.array_equal(pad[:, 0], np.broadcast_to(_unit([10, 30]), (3, 2)))
    assert np.all(pad[:, 1] == 0.0)
    # A 2x2 square enlarged to 4x4 by PIL's BILINEAR (triangle filter, pixel centres at
    # (i + 0.5) / 2 - 0.5 in source coordinates, edge weights renormalised), rounded to 8 bits:
    # e.g. out[1, 1] = 0.75 * (0.75*0 + 0.25*100) + 0.25 * (0.75*200 + 0.25*40) = 58.75 -> 59.
    square = Image.fromarray(np.array([[0, 100], [200, 40]], dtype=np.uint8))
    expected = _unit([[0, 25, 75, 100], [50, 59, 76, 85], [150, 126, 79, 55], [200, 160, 80, 40]])
    for geometry in ("center-crop", "resize", "pad"):  # squares: all policies agree
        assert np.array_equal(prepare_image(square, 1, 4, geometry)[0], expected)


def test_square_images_are_the_same_under_every_policy():
    img = _photo(20, 20)
    ref = prepare_image(img, 3, 8)
    for geometry in ("resize", "pad"):
        assert np.array_equal(prepare_image(img, 3, 8, geometry), ref)
    with pytest.raises(ValueError, match="unknown geometry"):
        prepare_image(img, 3, 8, "stretch")  # type: ignore[arg-type]


MIXED = [(8, 8), (16, 8), (4, 4), (10, 16)]  # (width, height) at size 8


def test_image_facts_of_a_mixed_set():
    crop = [image_facts(w, h, 8, "center-crop") for w, h in MIXED]
    assert [f.cropped for f in crop] == [False, True, False, True]
    assert [f.area_lost for f in crop] == [0.0, 0.5, 0.0, 0.375]  # 1.6:1 loses 37.5%
    assert [f.upscaled for f in crop] == [False, False, True, False]
    pad = [image_facts(w, h, 8, "pad") for w, h in MIXED]
    assert [f.padded for f in pad] == [False, True, False, True]
    # (16, 8) -> 8x4 content; (10, 16) -> 5x8 (10 * 8 / 16 = 5).
    assert [f.pad_share for f in pad] == [0.0, 0.5, 0.0, 1 - 40 / 64]
    assert [f.upscaled for f in pad] == [False, False, True, False]
    squash = [image_facts(w, h, 8, "resize") for w, h in MIXED]
    assert [f.squashed for f in squash] == [False, True, False, True]
    assert not any(f.cropped or f.padded for f in squash)
    assert image_facts(5, 20, 8, "resize").upscaled  # one axis enlarged is an upscale


def _mixed_store(workspace) -> LanceStore:
    store = LanceStore(str(workspace / "lancedb"))
    items = [(f"m{i}", png_bytes(np.asarray(_photo(w, h)))) for i, (w, h) in enumerate(MIXED)]
    rows = _rows("mixed", items)
    rows = rows.set_column(6, "width", pa.array([w for w, _ in MIXED], pa.int32()))
    rows = rows.set_column(7, "height", pa.array([h for _, h in MIXED], pa.int32()))
    store.insert_new("samples", rows)
    return store


def test_load_reports_geometry_counts_and_warns(workspace, caplog):
    store = _mixed_store(workspace)
    with caplog.at_level("WARNING", logger="diffcurate.models.images"):
        loaded = load_training_images(store, "mixed", channels=3, size=8)
    report = loaded.geometry
    assert report == GeometryReport(
        geometry="center-crop", size=8, n_images=4, cropped=2, upscaled=1, squashed=0,
        padded=0, max_area_lost=0.5, max_pad_share=0.0,
    )  # fmt: skip
    assert "2 of 4 images were center-cropped" in caplog.text and "50.0%" in caplog.text
    assert "1 of 4 images are smaller than the model's 8px input" in caplog.text
    assert report.warning(threshold=0.5) is None  # 2/4 and 1/4 are not above one half
    assert "upscaled" in report.warning(threshold=0.25 - 1e-9)
    padded = load_training_images(store, "mixed", channels=3, size=8, geometry="pad")
    assert (padded.geometry.padded, padded.geometry.cropped, padded.geometry.upscaled) == (2, 0, 1)
    assert padded.geometry.max_pad_share == 0.5
    for row, (w, h) in enumerate(MIXED):
        img = _photo(w, h)
        assert np.array_equal(padded.pixels[row].numpy(), prepare_image(img, 3, 8, "pad"))


def test_images_for_unet_refuses_latent_unets(digit_store):
    store, _ = digit_store
    unet = reference_model("tiny").unet
    unet.register_to_config(in_channels=4)
    with pytest.raises(ValueError, match=r"VAE latents rather than pixels.*load_inputs"):
        images_for_unet(store, "digits", unet)


def test_prepared_arrays_are_c_contiguous():
    # A channels-last stack would make torch pick other conv kernels (other round-off).
    for geometry in ("center-crop", "resize", "pad"):
        for channels in (1, 3):
            out = prepare_image(_photo(12, 6), channels, 8, geometry)
            assert out.flags.c_contiguous and out.dtype == np.float32
            assert np.stack([out, out]).flags.c_contiguous


def test_long_id_lists_and_chunked_reads_give_the_same_rows(digit_store, monkeypatch):
    store, ids = digit_store
    want = [ids[9], ids[2], ids[17], ids[0], ids[5]]
    short = load_training_images(store, "digits", channels=1, size=8, sample_ids=want)
    monkeypatch.setattr(images_module, "READ_ROWS", 3)  # 5 ids now take the full-scan path
    long = load_training_images(store, "digits", channels=1, size=8, sample_ids=want)
    assert long.sample_ids == short.sample_ids == want
    assert torch.equal(long.pixels, short.pixels)
    with pytest.raises(ImageLoadError, match="not in dataset"):
        load_training_images(store, "digits", channels=1, size=8, sample_ids=[*want, "x-1"])
    chunked = list(iter_image_bytes(store, "digits", want, rows_per_read=2))
    assert [sid for sid, _ in chunked] == want
    assert all(isinstance(data, bytes) and data[:4] == b"\x89PNG" for _, data in chunked)
