"""What a diffusion model consumes, derived once from the model, and the loader that builds it.

Every stage (training, scoring, attribution, gating) asks :class:`ModelInputs` instead of
guessing shapes from the UNet: a latent text-to-image UNet takes 4-channel latents, but its
images are 3-channel pixels at the latent size times the VAE's downsampling factor
(``2 ** (len(vae.config.block_out_channels) - 1)``).

:func:`load_inputs` turns stored samples into the diffusion-space ``x0`` the objective works on.
For latent models that is the VAE posterior mean minus ``shift_factor`` (where the VAE defines
one) times ``scaling_factor``, exactly :meth:`DiffusionObjective.encode
<diffcurate.influence.objective.DiffusionObjective.encode>` applied to the float32 pixels of
:mod:`diffcurate.models.images`, computed in the VAE's own dtype and returned as float32. Latents
are looked up in the :mod:`latent cache <diffcurate.storage.latent_cache>` first; only misses
are decoded, encoded (in batches, without autograd) and then stored, so a second load of the
same samples with the same VAE, size and geometry encodes nothing.

Bit-exactness: ``encode_pixels`` equals ``DiffusionObjective.encode`` bit for bit on the same
batch. Across batch sizes, conv kernels round differently (about 1e-7 in float32), which is one
more reason to compute latents once and cache them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from diffusers import AutoencoderKL

from diffcurate.influence.objective import on_device
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.images import (
    READ_ROWS,
    Geometry,
    GeometryReport,
    SampleStore,
    decode_sample,
    image_facts,
    iter_image_bytes,
    prepare_image,
    read_sample_rows,
)

log = logging.getLogger(__name__)


class LatentStore(Protocol):
    """A cache of VAE latents (``storage.latent_cache.LatentCache``)."""

    def key(self, vae: torch.nn.Module, size: int, geometry: str, dtype: torch.dtype) -> str: ...
    def get(self, dataset: str, sample_ids: Sequence[str], key: str) -> dict[str, np.ndarray]: ...
    def put(
        self, dataset: str, sample_ids: Sequence[str], key: str, latents: torch.Tensor
    ) -> int: ...


class InputStore(SampleStore, Protocol):
    """Sample tables plus their latent cache (``storage.LanceStore`` provides both)."""

    @property
    def latents(self) -> LatentStore: ...


@dataclass(frozen=True)
class ModelInputs:
    """The inputs of one diffusion model.

    Attributes:
        pixel_channels: Channels of the images (1 or 3): the VAE's ``in_channels`` for latent
            models, the UNet's for pixel models.
        pixel_size: Square side of the images: latent size × VAE downsampling factor, or the
            UNet's ``sample_size``.
        latent: Whether the UNet works on VAE latents.
        diffusion_shape: ``(C, H, W)`` of the UNet's input (what ``x0`` rows look like).
        geometry: How images are fitted to ``pixel_size``.
        text_conditional: Whether the UNet takes caption embeddings.
    """

    pixel_channels: int
    pixel_size: int
    latent: bool
    diffusion_shape: tuple[int, int, int]
    geometry: Geometry
    text_conditional: bool

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one prepared image."""
        return self.pixel_channels, self.pixel_size, self.pixel_size

    @classmethod
    def of(cls, model: DiffusionModel, geometry: Geometry = "center-crop") -> ModelInputs:
        """Derive the inputs of ``model``.

        Raises:
            ValueError: The UNet's input is not square, the VAE's latents do not fit the UNet,
                or the images would not have 1 or 3 channels (e.g. a 4-channel UNet without
                its VAE).
        """
        channels, height, width = model.sample_shape
        if height != width:
            raise ValueError(f"non-square UNet sample_size {(height, width)} is not supported")
        if model.vae is None:
            pixel_channels, pixel_size = channels, height
            if channels not in (1, 3):
                raise ValueError(
                    f"the UNet takes {channels}-channel inputs but the model has no VAE: a "
                    "latent-diffusion model needs its vae/ directory"
                )
        else:
            cfg = model.vae.config
            if int(cfg.latent_channels) != channels:
                raise ValueError(
                    f"the VAE makes {cfg.latent_channels}-channel latents but the UNet takes "
                    f"{channels} channels"
                )
            pixel_channels = int(cfg.in_channels)
            pixel_size = height * 2 ** (len(cfg.block_out_channels) - 1)
            if pixel_channels not in (1, 3):
                raise ValueError(f"VAEs with {pixel_channels} image channels are not supported")
        return cls(
            pixel_channels=pixel_channels,
            pixel_size=pixel_size,
            latent=model.vae is not None,
            diffusion_shape=(channels, height, width),
            geometry=geometry,
            text_conditional=model.conditional,
        )


@dataclass(frozen=True)
class PreparedInputs:
    """Samples converted for one model, rows in ``sample_ids`` order.

    Attributes:
        x0: float32 ``[N, *diffusion_shape]``: VAE latents for latent models, pixels otherwise.
        pixels: float32 ``[N, *pixel_shape]`` in [-1, 1]; for latent models only when asked
            for (``with_pixels=True``), else None. For pixel models it is ``x0``.
        sample_ids: The sample of each row.
        captions: Each sample's caption.
        geometry: What the geometry policy did to these images.
        inputs: The model's :class:`ModelInputs`.
        n_encoded: Samples run through the VAE by this call (0 for pixel models and cache hits).
    """

    x0: torch.Tensor
    pixels: torch.Tensor | None
    sample_ids: list[str]
    captions: list[str]
    geometry: GeometryReport
    inputs: ModelInputs
    n_encoded: int


def encode_pixels(
    model: DiffusionModel, pixels: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """Diffusion-space ``x0`` of ``pixels``, ``batch_size`` images per VAE forward pass.

    Identical to ``DiffusionObjective.encode``: identity without a VAE, else the posterior mean
    minus ``shift_factor`` (when set) times ``scaling_factor``, computed on the VAE's device and
    dtype and returned in the dtype and device of ``pixels``.

    Args:
        model: The model (only its ``vae`` is used).
        pixels: ``[n, C, H, W]`` in [-1, 1].
        batch_size: Images per forward pass (memory bound).
    """
    if model.vae is None:
        return pixels
    return _vae_latents(model.vae, pixels, batch_size)


def _vae_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None)
    out = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start : start + batch_size]
            mean = vae.encode(chunk.to(param)).latent_dist.mean
            if shift is not None:
                mean = mean - shift
            out.append((mean * vae.config.scaling_factor).to(chunk))
    if not out:
        side = pixels.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
        return pixels.new_empty((0, int(vae.config.latent_channels), side, side))
    return torch.cat(out)


def load_inputs(
    store: InputStore,
    dataset: str,
    model: DiffusionModel,
    sample_ids: Sequence[str] | None = None,
    *,
    geometry: Geometry = "center-crop",
    cache: bool = True,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    with_pixels: bool = False,
) -> PreparedInputs:
    """Read samples from LanceDB and convert them to what ``model`` consumes.

    Args:
        store: The workspace's LanceDB tables (samples; latents when ``cache``).
        dataset: Dataset name in ``samples``.
        model: The diffusion model.
        sample_ids: Only these samples, in this order; None means the whole dataset in table
            order.
        geometry: How images are fitted to the model's pixel size.
        cache: Look latents up in, and add new ones to, the ``latents`` table.
        batch_size: Images decoded and encoded at a time (memory bound). A VAE's output
            depends on its batch only by float round-off (about 1e-7); once cached, a latent
            no longer changes with later batch compositions.
        device: Where the VAE encodes. Put the model there beforehand: a VAE elsewhere is
            copied per call (the caller's model is never changed). Returned tensors are on
            the CPU.
        with_pixels: Also return the pixels of a latent model (decodes cache hits too).

    Returns:
        :class:`PreparedInputs`. A geometry warning is logged when
        :meth:`GeometryReport.warning` has one.

    Raises:
        ImageLoadError: No samples, a requested id is absent or duplicated, or an image cannot
            be decoded.
        FloatingPointError: The VAE produced non-finite latents (named by sample).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = ModelInputs.of(model, geometry)
    meta = read_sample_rows(store, dataset, sample_ids, ["caption", "width", "height"])
    ids: list[str] = meta.column("sample_id").to_pylist()
    size = inputs.pixel_size
    report = geometry_report(meta, inputs, dataset)

    n = len(ids)
    position = {sid: i for i, sid in enumerate(ids)}
    keep_pixels = with_pixels or not inputs.latent
    pixels = torch.empty((n, *inputs.pixel_shape), dtype=torch.float32) if keep_pixels else None
    x0 = torch.empty((n, *inputs.diffusion_shape), dtype=torch.float32) if inputs.latent else pixels
    assert x0 is not None

    vae: AutoencoderKL | None = None
    key = None
    latent_cache = store.latents if cache and inputs.latent else None
    hits: dict[str, np.ndarray] = {}
    if inputs.latent:
        assert model.vae is not None
        vae_dtype = next(model.vae.parameters()).dtype
        vae = on_device(model.vae, vae_dtype, torch.device(device))
        if latent_cache is not None:
            key = latent_cache.key(model.vae, size, geometry, vae_dtype)
            hits = latent_cache.get(dataset, ids, key)
        for sid, latent in hits.items():
            x0[position[sid]] = torch.from_numpy(latent)
    to_read = ids if keep_pixels else [sid for sid in ids if sid not in hits]

    n_encoded = 0
    batch_ids: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal n_encoded
        rows = [position[sid] for sid in batch_ids]
        chunk = torch.from_numpy(np.ascontiguousarray(np.stack(batch)))
        if pixels is not None:
            pixels[rows] = chunk
        if vae is not None:
            misses = [i for i, sid in enumerate(batch_ids) if sid not in hits]
            if misses:
                encoded = encode_checked(vae, chunk[misses], [batch_ids[i] for i in misses])
                x0[[rows[i] for i in misses]] = encoded
                n_encoded += len(misses)
                if latent_cache is not None:
                    assert key is not None
                    latent_cache.put(dataset, [batch_ids[i] for i in misses], key, encoded)
        batch_ids.clear()
        batch.clear()

    for sid, data in iter_image_bytes(store, dataset, to_read, max(batch_size, READ_ROWS)):
        batch.append(prepare_image(decode_sample(data, sid), inputs.pixel_channels, size, geometry))
        batch_ids.append(sid)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()

    captions = [c or "" for c in meta.column("caption").to_pylist()]
    return PreparedInputs(
        x0=x0,
        pixels=pixels,
        sample_ids=ids,
        captions=captions,
        geometry=report,
        inputs=inputs,
        n_encoded=n_encoded,
    )


def geometry_report(meta: pa.Table, inputs: ModelInputs, dataset: str) -> GeometryReport:
    """What ``inputs.geometry`` does to the images whose stored ``width``/``height`` are in
    ``meta`` (read from metadata, no image decoded); logs the report's warning, if any."""
    size, geometry = inputs.pixel_size, inputs.geometry
    report = GeometryReport.of(
        (
            image_facts(int(w), int(h), size, geometry)
            for w, h in zip(
                meta.column("width").to_pylist(), meta.column("height").to_pylist(), strict=True
            )
        ),
        geometry,
        size,
    )
    if (message := report.warning()) is not None:
        log.warning("dataset %r: %s", dataset, message)
    return report


def encode_checked(
    vae: AutoencoderKL, pixels: torch.Tensor, sample_ids: Sequence[str]
) -> torch.Tensor:
    """float32 CPU latents of one batch, refusing non-finite ones by sample id."""
    latents = _vae_latents(vae, pixels, len(pixels))
    finite = torch.isfinite(latents.flatten(1)).all(dim=1)
    if not bool(finite.all()):
        bad = [sid for sid, ok in zip(sample_ids, finite.tolist(), strict=True) if not ok]
        raise FloatingPointError(f"the VAE produced non-finite latents for samples {bad[:5]}")
    return latents.to("cpu", torch.float32)
