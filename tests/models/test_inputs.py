"""What a model consumes: shapes derived from the model, latents equal to the objective's
encoding, and the latent cache making a second load encode nothing."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from PIL import Image

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.images import ImageLoadError, load_training_images
from diffcurate.models.inputs import ModelInputs, encode_pixels, load_inputs
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.latent_cache import LatentCache, latent_cache_key
from diffcurate.storage.schemas import SAMPLES
from imagebytes import png_bytes
from tiny_unets import images, scheduler, tiny_unet, tiny_vae

SIZES = [(16, 16), (16, 16), (24, 16), (16, 16), (12, 12), (16, 20), (16, 16)]  # (w, h)


def rgb_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny RGB AutoencoderKL: 3×16×16 images → 4×8×8 latents (like SD's 3 → 4 channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def latent_model(vae: AutoencoderKL | None = None) -> DiffusionModel:
    """A text-conditional latent model: a 4-channel 8×8 UNet2DConditionModel on ``rgb_vae``."""
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=6,
        attention_head_dim=4,
    )
    return DiffusionModel(unet=unet, scheduler=scheduler(), vae=rgb_vae() if vae is None else vae)


def _insert(store: LanceStore, dataset: str, items: list[tuple[str, np.ndarray, str]]) -> None:
    n = len(items)
    table = pa.table(
        {
            "sample_id": [sid for sid, _, _ in items],
            "dataset": [dataset] * n,
            "key": [sid for sid, _, _ in items],
            "source": ["test"] * n,
            "image": [png_bytes(px) for _, px, _ in items],
            "image_format": ["PNG"] * n,
            "width": [px.shape[1] for _, px, _ in items],
            "height": [px.shape[0] for _, px, _ in items],
            "sha256": ["0"] * n,
            "phash": ["0"] * n,
            "caption": [cap for _, _, cap in items],
            "metadata": ["{}"] * n,
            "embedding_model": [None] * n,
            "image_embedding": [None] * n,
            "text_embedding": [None] * n,
            "ingest_run_id": ["r"] * n,
            "ingested_at": [datetime.now(UTC)] * n,
        },
        schema=SAMPLES,
    )
    store.insert_new("samples", table)


@pytest.fixture
def photo_store(tmp_path) -> tuple[LanceStore, list[str]]:
    store = LanceStore(str(tmp_path / "db"))
    rng = np.random.default_rng(0)
    items = [
        (f"p{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"photo {i}")
        for i, (w, h) in enumerate(SIZES)
    ]
    _insert(store, "photos", items)
    return store, [sid for sid, _, _ in items]


def _count_encodes(vae: AutoencoderKL) -> list[int]:
    """Batch sizes of every VAE encoder forward pass from now on."""
    calls: list[int] = []
    vae.encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def _objective(vae: AutoencoderKL) -> DiffusionObjective:
    return DiffusionObjective(scheduler(), TimestepSchedule(timesteps=(10,)), vae=vae)


def _reference_latents(store, model, ids, batch, geometry="center-crop") -> torch.Tensor:
    """``DiffusionObjective.encode`` on the pixels of ``load_training_images``, batch by batch."""
    inputs = ModelInputs.of(model, geometry)
    pixels = load_training_images(
        store, "photos", channels=inputs.pixel_channels, size=inputs.pixel_size, sample_ids=ids,
        geometry=geometry,
    ).pixels  # fmt: skip
    obj = _objective(model.vae)
    return torch.cat([obj.encode(pixels[s : s + batch]) for s in range(0, len(ids), batch)])


# ----------------------------------------------------------------------------- ModelInputs
def test_model_inputs_of_pixel_and_latent_models():
    pixel = DiffusionModel(unet=tiny_unet(), scheduler=scheduler())
    assert ModelInputs.of(pixel) == ModelInputs(
        pixel_channels=1, pixel_size=8, latent=False, diffusion_shape=(1, 8, 8),
        geometry="center-crop", text_conditional=False,
    )  # fmt: skip
    latent = latent_model()
    inputs = ModelInputs.of(latent, "pad")
    assert inputs == ModelInputs(
        pixel_channels=3, pixel_size=16, latent=True, diffusion_shape=(4, 8, 8),
        geometry="pad", text_conditional=True,
    )  # fmt: skip
    assert inputs.pixel_shape == (3, 16, 16)
    latent.vae.register_to_config(block_out_channels=(4, 4, 4, 4))  # SD's VAE: factor 8
    assert ModelInputs.of(latent).pixel_size == 64


def test_model_inputs_refuse_what_cannot_be_fed():
    four = UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="4-channel inputs but the model has no VAE"):
        ModelInputs.of(DiffusionModel(unet=four, scheduler=scheduler()))
    with pytest.raises(ValueError, match="VAE makes 1-channel latents but the UNet takes 4"):
        ModelInputs.of(DiffusionModel(unet=four, scheduler=scheduler(), vae=tiny_vae()))


# ---------------------------------------------------------------------------- encode_pixels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_pixels_is_the_objectives_encoding_bit_for_bit(dtype):
    vae = tiny_vae().to(dtype)
    model = DiffusionModel(unet=tiny_unet(), scheduler=scheduler(), vae=vae)
    x = images(7, (1, 8, 8)).to(dtype)
    obj = _objective(vae)
    assert torch.equal(encode_pixels(model, x, batch_size=7), obj.encode(x))
    assert torch.equal(encode_pixels(model, x, batch_size=32), obj.encode(x))
    for batch in (1, 3):  # per batch, identical; across batch sizes only float round-off
        expected = torch.cat([obj.encode(x[s : s + batch]) for s in range(0, 7, batch)])
        got = encode_pixels(model, x, batch_size=batch)
        assert got.dtype == dtype and torch.equal(got, expected)
        torch.testing.assert_close(got, obj.encode(x), rtol=0, atol=1e-6)
    pixel_model = DiffusionModel(unet=tiny_unet(), scheduler=scheduler())
    assert encode_pixels(pixel_model, x) is x


def test_encode_pixels_applies_shift_and_scaling_factor():
    vae = rgb_vae()
    vae.register_to_config(scaling_factor=0.25, shift_factor=0.1)
    model = DiffusionModel(unet=None, scheduler=scheduler(), vae=vae)  # type: ignore[arg-type]
    x = images(3, (3, 16, 16)).float()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    assert torch.equal(encode_pixels(model, x, 3), (mean - 0.1) * 0.25)
    assert torch.equal(encode_pixels(model, x, 3), _objective(vae).encode(x))


# ------------------------------------------------------------------------------ load_inputs
def test_pixel_model_inputs_are_the_training_images(photo_store):
    store, ids = photo_store
    rgb_unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    model = DiffusionModel(unet=rgb_unet, scheduler=scheduler())
    loaded = load_inputs(store, "photos", model, batch_size=3)
    expected = load_training_images(store, "photos", channels=3, size=16)
    assert loaded.sample_ids == ids == expected.sample_ids
    assert torch.equal(loaded.x0, expected.pixels) and loaded.pixels is loaded.x0
    assert loaded.geometry == expected.geometry
    assert loaded.captions == [f"photo {i}" for i in range(len(ids))]
    assert loaded.n_encoded == 0 and not store.has_table("latents")


def test_latents_equal_the_objective_and_a_second_load_encodes_nothing(photo_store):
    store, ids = photo_store
    model = latent_model()
    calls = _count_encodes(model.vae)
    first = load_inputs(store, "photos", model, batch_size=3)
    assert calls == [3, 3, 1] and first.n_encoded == len(ids)
    assert first.x0.shape == (len(ids), 4, 8, 8) and first.x0.dtype == torch.float32
    assert torch.equal(first.x0, _reference_latents(store, model, ids, 3))
    assert first.pixels is None and first.sample_ids == ids
    assert first.geometry.cropped == 2 and first.geometry.upscaled == 1  # (24,16), (16,20); 12px
    key = latent_cache_key(model.vae, 16, "center-crop", torch.float32)
    assert LatentCache(store).count(key) == len(ids)

    calls.clear()
    second = load_inputs(store, "photos", model, batch_size=3)
    assert calls == [] and second.n_encoded == 0
    assert torch.equal(second.x0, first.x0)
    assert second.geometry == first.geometry and second.captions == first.captions

    with_px = load_inputs(store, "photos", model, with_pixels=True)
    assert calls == [] and torch.equal(with_px.x0, first.x0)
    expected_px = load_training_images(store, "photos", channels=3, size=16).pixels
    assert torch.equal(with_px.pixels, expected_px)


def test_only_cache_misses_are_encoded_in_requested_order(photo_store):
    store, ids = photo_store
    model = latent_model()
    calls = _count_encodes(model.vae)
    part = load_inputs(store, "photos", model, [ids[5], ids[1]], batch_size=4)
    assert calls == [2] and part.sample_ids == [ids[5], ids[1]]
    calls.clear()
    full = load_inputs(store, "photos", model, ids[::-1], batch_size=4)
    assert sum(calls) == len(ids) - 2 and full.n_encoded == len(ids) - 2
    assert full.sample_ids == ids[::-1]
    assert torch.equal(full.x0[ids[::-1].index(ids[5])], part.x0[0])
    assert torch.equal(full.x0[ids[::-1].index(ids[1])], part.x0[1])
    reference = _reference_latents(store, model, ids[::-1], len(ids))
    torch.testing.assert_close(full.x0, reference, rtol=0, atol=1e-6)


def test_a_changed_vae_weight_or_geometry_reencodes(photo_store):
    store, ids = photo_store
    model = latent_model()
    calls = _count_encodes(model.vae)
    before = load_inputs(store, "photos", model, batch_size=8)
    old_key = latent_cache_key(model.vae, 16, "center-crop", torch.float32)
    with torch.no_grad():
        model.vae.quant_conv.bias[0] += 0.5  # shifts latent channel 0 of the posterior mean
    calls.clear()
    after = load_inputs(store, "photos", model, batch_size=8)
    assert calls == [len(ids)] and after.n_encoded == len(ids)
    assert torch.equal(after.x0, _reference_latents(store, model, ids, 8))
    delta = (after.x0 - before.x0) / model.vae.config.scaling_factor
    torch.testing.assert_close(delta[:, 0], torch.full_like(delta[:, 0], 0.5))
    torch.testing.assert_close(delta[:, 1:], torch.zeros_like(delta[:, 1:]), rtol=0, atol=0)
    new_key = latent_cache_key(model.vae, 16, "center-crop", torch.float32)
    cache = LatentCache(store)
    assert new_key != old_key and cache.count(new_key) == cache.count(old_key) == len(ids)

    calls.clear()
    padded = load_inputs(store, "photos", model, batch_size=8, geometry="pad")
    assert calls == [len(ids)] and padded.geometry.padded == 2
    assert torch.equal(padded.x0, _reference_latents(store, model, ids, 8, "pad"))
    assert not torch.equal(padded.x0[2], after.x0[2])  # the 24x16 image is fitted differently
    assert torch.equal(padded.x0[0], after.x0[0])  # a 16x16 image is not


def test_float64_vae_on_real_digits(tmp_path, digit_files):
    store = LanceStore(str(tmp_path / "db"))
    digits = [
        (f.key, np.asarray(Image.open(io.BytesIO(f.image))), f.caption) for f in digit_files[:5]
    ]
    _insert(store, "photos", digits)
    unet = UNet2DModel(
        sample_size=4, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    model = DiffusionModel(unet=unet, scheduler=scheduler(), vae=tiny_vae())  # float64 VAE
    loaded = load_inputs(store, "photos", model)
    assert loaded.x0.dtype == torch.float32 and loaded.x0.shape == (5, 1, 4, 4)
    assert torch.equal(loaded.x0, _reference_latents(store, model, [d[0] for d in digits], 32))
    assert loaded.geometry.cropped == loaded.geometry.upscaled == 0
    assert LatentCache(store).count(latent_cache_key(model.vae, 8, "center-crop", torch.float64))


def test_cache_off_and_batch_size_change_only_round_off(photo_store):
    store, _ = photo_store
    model = latent_model()
    calls = _count_encodes(model.vae)
    a = load_inputs(store, "photos", model, cache=False, batch_size=2)
    b = load_inputs(store, "photos", model, cache=False, batch_size=5)
    assert calls == [2, 2, 2, 1, 5, 2] and not store.has_table("latents")
    torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=1e-6)


def test_bad_requests_and_non_finite_latents(photo_store):
    store, ids = photo_store
    model = latent_model()
    with pytest.raises(ImageLoadError, match="not in dataset 'photos'"):
        load_inputs(store, "photos", model, [ids[0], "nope"])
    with pytest.raises(ImageLoadError, match="has no samples"):
        load_inputs(store, "empty", model)
    with torch.no_grad():
        model.vae.quant_conv.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite latents"):
        load_inputs(store, "photos", model)
    key = latent_cache_key(model.vae, 16, "center-crop", torch.float32)
    assert LatentCache(store).count(key) == 0
