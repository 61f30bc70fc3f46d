"""Training rows streamed from LanceDB, one keyed batch at a time.

Why: a hygiene run fine-tunes on every kept sample; decoding them all into one tensor makes its
memory grow with the corpus. :class:`LanceTrainingData` keeps only the small per-sample columns
(id, content hash, caption) and, for each batch the trainer asks for, reads and decodes just
those rows, so peak memory is bounded by the batch size.

Rows equal :func:`~diffcurate.models.inputs.load_inputs`'s bit for bit: pixels go through the
same decode and geometry code; latents come from the latent cache, which a first pass fills
exactly as ``load_inputs`` would (misses encoded in the same chunks, in the same order), because
a VAE's output depends on its batch by round-off and a latent must not change with the batch
it was drawn in. Caption states are encoded per batch.

The fingerprint hashes the samples' stored content hashes, captions, the input geometry and the
latent cache key, never decoded tensors, so checking a checkpoint before resuming reads nothing
large either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from diffcurate.influence.objective import on_device
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.images import (
    READ_ROWS,
    Geometry,
    GeometryReport,
    decode_sample,
    iter_image_bytes,
    prepare_image,
    read_sample_rows,
)
from diffcurate.models.inputs import InputStore, ModelInputs, encode_checked, geometry_report
from diffcurate.models.training_data import update_with_tensors

FINGERPRINT_VERSION = "lance-training-data/1"


class LanceTrainingData:
    """The diffusion-space rows of ``sample_ids`` of one dataset, read per batch.

    Args:
        store: The workspace's LanceDB tables (samples, and the latent cache).
        dataset: Dataset name in ``samples``.
        model: The model the rows are for (pixel size, VAE, text encoder).
        sample_ids: The rows, in this order (positions index into it); None: the whole
            dataset in table order.
        geometry: How images are fitted to the model's pixel size.
        encode_batch_size: Images per VAE pass when filling the latent cache.
        device: Where the VAE encodes.

    Attributes:
        inputs: The model's :class:`ModelInputs`.
        sample_ids: Row order.
        captions: Each row's caption.
        geometry: What the geometry policy does to these images (from stored sizes).
        n_encoded: Latents this object's first pass computed (0: all were cached).
        rows_decoded: Rows read from storage by :meth:`batch` so far (a memory witness).

    Raises:
        ImageLoadError: A requested id is absent or duplicated (an empty ``sample_ids`` gives
            empty data, which training and mitigation refuse by name).
        ValueError: A text-conditional model without its text encoder.
    """

    def __init__(
        self,
        store: InputStore,
        dataset: str,
        model: DiffusionModel,
        sample_ids: Sequence[str] | None,
        *,
        geometry: Geometry = "center-crop",
        encode_batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        if model.conditional and model.text_encoder is None:
            raise ValueError("a text-conditional model needs its text encoder (text_encoder/)")
        self.store, self.dataset, self.model = store, dataset, model
        self.inputs = ModelInputs.of(model, geometry)
        columns = ["caption", "width", "height", "sha256"]
        if sample_ids is None or len(sample_ids):
            meta = read_sample_rows(store, dataset, sample_ids, columns)
        else:  # an empty split is the caller's to refuse, with its own message
            meta = pa.table({c: pa.array([], pa.string()) for c in ["sample_id", *columns]})
        self.sample_ids: list[str] = meta.column("sample_id").to_pylist()
        self.captions = [c or "" for c in meta.column("caption").to_pylist()]
        self._hashes: list[str] = meta.column("sha256").to_pylist()
        self.geometry: GeometryReport = geometry_report(meta, self.inputs, dataset)
        self.rows_decoded = 0
        self.n_encoded = 0
        self._key: str | None = None
        if self.inputs.latent:
            self._fill_latent_cache(encode_batch_size, torch.device(device))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.inputs.diffusion_shape

    @property
    def conditional(self) -> bool:
        return self.inputs.text_conditional

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _fill_latent_cache(self, batch_size: int, device: torch.device) -> None:
        """Encode and store the latents the cache lacks, chunked as ``load_inputs`` chunks."""
        vae = self.model.vae
        assert vae is not None
        dtype = next(vae.parameters()).dtype
        cache = self.store.latents
        self._key = cache.key(vae, self.inputs.pixel_size, self.inputs.geometry, dtype)
        misses: list[str] = []
        for start in range(0, len(self.sample_ids), READ_ROWS):
            chunk = self.sample_ids[start : start + READ_ROWS]
            have = cache.get(self.dataset, chunk, self._key)
            misses.extend(sid for sid in chunk if sid not in have)
        if not misses:
            return
        encoder = on_device(vae, dtype, device)
        batch_ids: list[str] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            pixels = torch.from_numpy(np.ascontiguousarray(np.stack(batch)))
            cache.put(self.dataset, batch_ids, key, encode_checked(encoder, pixels, batch_ids))
            self.n_encoded += len(batch_ids)
            batch_ids.clear()
            batch.clear()

        key = self._key
        for sid, data in iter_image_bytes(self.store, self.dataset, misses,
                                          max(batch_size, READ_ROWS)):  # fmt: skip
            batch.append(self._prepare(sid, data))
            batch_ids.append(sid)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()

    def _prepare(self, sid: str, data: bytes) -> np.ndarray:
        inputs = self.inputs
        img = decode_sample(data, sid)
        return prepare_image(img, inputs.pixel_channels, inputs.pixel_size, inputs.geometry)

    def _x0(self, positions: Sequence[int]) -> torch.Tensor:
        """float32 rows of distinct ``positions``, read and decoded (or looked up) now."""
        ids = [self.sample_ids[p] for p in positions]
        if self.inputs.latent:
            assert self._key is not None
            got = self.store.latents.get(self.dataset, ids, self._key)
            missing = [sid for sid in ids if sid not in got]
            if missing:
                raise KeyError(f"latents of {missing[:5]} left the cache during training")
            rows = np.stack([got[sid] for sid in ids])
        else:
            rows = np.stack([self._prepare(sid, data)
                             for sid, data in iter_image_bytes(self.store, self.dataset, ids,
                                                               len(ids))])  # fmt: skip
        self.rows_decoded += len(ids)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def _conditioning(self, positions: Sequence[int]) -> torch.Tensor:
        assert self.model.text_encoder is not None
        return self.model.text_encoder.encode([self.captions[p] for p in positions])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = [int(i) for i in idx]
        unique = list(dict.fromkeys(positions))
        where = {p: i for i, p in enumerate(unique)}
        order = torch.tensor([where[p] for p in positions], dtype=torch.long)
        cond = self._conditioning(unique)[order] if self.conditional else None
        return self._x0(unique)[order], cond

    def tensor_fingerprint(self, *extra: torch.Tensor | None) -> str:
        """What :meth:`TensorData.fingerprint
        <diffcurate.models.training_data.TensorData.fingerprint>` gives for these rows as
        tensors (``x0``, caption states, ``extra``), computed ``READ_ROWS`` rows at a time: how
        a checkpoint written by a run on in-memory tensors is recognised (one pass over the
        data, only when resuming one)."""
        digest = hashlib.sha256()
        n, chunks = len(self), [range(s, min(len(self), s + READ_ROWS))
                                for s in range(0, len(self), READ_ROWS)]  # fmt: skip
        digest.update(str(((n, *self.sample_shape), torch.float32)).encode())
        for chunk in chunks:
            digest.update(self._x0(list(chunk)).numpy().tobytes())
        if self.conditional:
            for i, chunk in enumerate(chunks):
                cond = self._conditioning(list(chunk)).contiguous()
                if i == 0:
                    digest.update(str(((n, *cond.shape[1:]), cond.dtype)).encode())
                digest.update(cond.numpy().tobytes())
        update_with_tensors(digest, extra)
        return digest.hexdigest()

    def fingerprint(self, *extra: torch.Tensor | None) -> str:
        digest = hashlib.sha256()
        head = (FINGERPRINT_VERSION, self.dataset, self.inputs, self._key)
        digest.update(repr(head).encode())
        for sha, caption in zip(self._hashes, self.captions, strict=True):
            digest.update(f"{sha}\0{caption if self.conditional else ''}\n".encode())
        update_with_tensors(digest, extra)
        return digest.hexdigest()
