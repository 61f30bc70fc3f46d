"""Training streamed from LanceDB: the same weights as training on the in-memory tensors, bit
for bit, resumable, and never more than one batch of images read at a time."""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import UNet2DModel

from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.inputs import load_inputs
from diffcurate.models.lance_data import LanceTrainingData
from diffcurate.models.train import TrainConfig, train
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.schemas import SAMPLES
from imagebytes import png_bytes
from tiny_pipelines import tiny_sd_pipeline
from tiny_unets import scheduler

N = 13
BATCH = 4


def _samples(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    sizes = [(16, 16), (24, 16), (16, 20), (12, 12)]
    blobs, widths, heights = [], [], []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        blobs.append(png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        widths.append(w)
        heights.append(h)
    ids = [f"s{i:02d}" for i in range(n)]
    return pa.table(
        {
            "sample_id": ids, "dataset": ["photos"] * n, "key": ids, "source": ["test"] * n,
            "image": blobs, "image_format": ["PNG"] * n, "width": widths, "height": heights,
            "sha256": [hashlib.sha256(b).hexdigest() for b in blobs], "phash": ["0"] * n,
            "caption": [f"photo number {i % 5}" for i in range(n)], "metadata": ["{}"] * n,
            "embedding_model": [None] * n, "image_embedding": [None] * n,
            "text_embedding": [None] * n, "ingest_run_id": ["r"] * n,
            "ingested_at": [datetime.now(UTC)] * n,
        },
        schema=SAMPLES,
    )  # fmt: skip


class SpyStore(LanceStore):
    """A store that records how many image blobs each read of ``samples`` returned."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.image_reads: list[int] = []

    def read(self, name, dataset=None, columns=None, where=None):  # type: ignore[no-untyped-def]
        table = super().read(name, dataset, columns, where)
        if name == "samples" and (columns is None or "image" in columns):
            self.image_reads.append(table.num_rows)
        return table


@pytest.fixture
def store(tmp_path) -> SpyStore:
    spy = SpyStore(str(tmp_path / "db"))
    spy.insert_new("samples", _samples(N))
    return spy


def _pixel_model() -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8,), down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    return DiffusionModel(unet=unet, scheduler=scheduler())


def _state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def _assert_same_weights(a: DiffusionModel, b: DiffusionModel) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


CONFIG = TrainConfig(steps=7, batch_size=BATCH, lr=1e-2, log_every=0)


def test_streamed_pixel_training_equals_in_memory_and_reads_one_batch_at_a_time(store):
    ids = [f"s{i:02d}" for i in range(N) if i != 3]  # a pruned selection, in its own order
    ids = ids[::-1]
    memory_model, streamed_model = _pixel_model(), _pixel_model()
    x0 = load_inputs(store, "photos", memory_model, ids).x0
    expected = train(memory_model, x0, CONFIG, progress=False)
    store.image_reads.clear()
    rows = LanceTrainingData(store, "photos", streamed_model, ids)
    assert store.image_reads == []  # construction reads no image
    got = train(streamed_model, rows, CONFIG, progress=False)
    assert got.losses == expected.losses
    _assert_same_weights(streamed_model, memory_model)
    # One read per step, each of at most one batch of distinct rows; never the corpus.
    assert len(store.image_reads) == CONFIG.steps
    assert max(store.image_reads) <= BATCH
    assert rows.rows_decoded == sum(store.image_reads)


def test_streamed_text_to_image_training_equals_in_memory(store, tmp_path):
    """Latents from the cache and caption states per batch, with caption dropout."""
    base = tiny_sd_pipeline(tmp_path / "sd")
    config = TrainConfig(steps=5, batch_size=BATCH, lr=1e-2, log_every=0, caption_dropout=0.3)
    memory_model = copy.deepcopy(base)
    prepared = load_inputs(store, "photos", memory_model)
    cond = memory_model.text_encoder.encode(prepared.captions)
    uncond = memory_model.text_encoder.encode([""])
    expected = train(memory_model, prepared.x0, config, progress=False, conditioning=cond,
                     unconditional=uncond)  # fmt: skip
    streamed_model = copy.deepcopy(base)
    rows = LanceTrainingData(store, "photos", streamed_model, prepared.sample_ids)
    assert rows.n_encoded == 0  # load_inputs cached every latent
    store.image_reads.clear()
    got = train(streamed_model, rows, config, progress=False, unconditional=uncond)
    assert store.image_reads == []  # latents come from the cache, not from decoded images
    assert got.losses == expected.losses
    _assert_same_weights(streamed_model, memory_model)


def test_streamed_latents_fill_the_cache_as_load_inputs_would(store, tmp_path, monkeypatch):
    base = tiny_sd_pipeline(tmp_path / "sd")
    ids = [f"s{i:02d}" for i in range(N)]
    rows = LanceTrainingData(store, "photos", base, ids, encode_batch_size=5)
    assert rows.n_encoded == N
    got, _ = rows.batch(torch.arange(N))
    other = SpyStore(str(tmp_path / "db2"))
    other.insert_new("samples", _samples(N))
    expected = load_inputs(other, "photos", base, ids, batch_size=5).x0
    assert torch.equal(got, expected)
    assert LanceTrainingData(store, "photos", base, ids).n_encoded == 0


def test_streamed_training_resumes_bit_exactly_and_refuses_other_samples(store, tmp_path):
    ids = [f"s{i:02d}" for i in range(N)]
    straight = _pixel_model()
    train(straight, LanceTrainingData(store, "photos", straight, ids), CONFIG, progress=False)
    resumed = _pixel_model()
    ck = tmp_path / "ck"
    rows = LanceTrainingData(store, "photos", resumed, ids)
    train(resumed, rows, CONFIG.model_copy(update={"steps": 3}), ck, progress=False)
    result = train(resumed, rows, CONFIG, ck, progress=False)
    assert result.start_step == 3
    _assert_same_weights(resumed, straight)
    fewer = LanceTrainingData(store, "photos", resumed, ids[:-1])
    with pytest.raises(ValueError, match="different images"):
        train(resumed, fewer, CONFIG.model_copy(update={"steps": 9}), ck, progress=False)


@pytest.mark.parametrize("method", ["finetune", "gradient-ascent"])
def test_streamed_mitigation_equals_in_memory(store, method):
    kept = [f"s{i:02d}" for i in range(N) if i % 4]
    removed = [f"s{i:02d}" for i in range(N) if not i % 4]
    model = _pixel_model()
    config = MitigationConfig(method=method, steps=4, batch_size=BATCH, forget_batch_size=2)
    kept_x0 = load_inputs(store, "photos", model, kept).x0
    removed_x0 = load_inputs(store, "photos", model, removed).x0
    memory, _ = mitigate(model, kept_x0, config, removed_images=removed_x0)
    store.image_reads.clear()
    streamed, result = mitigate(
        model, LanceTrainingData(store, "photos", model, kept), config,
        removed_images=LanceTrainingData(store, "photos", model, removed),
    )  # fmt: skip
    _assert_same_weights(streamed, memory)
    assert max(store.image_reads) <= BATCH
    assert result.steps == 4


def test_an_empty_split_is_refused_by_the_mitigation_not_by_the_reader(store):
    model = _pixel_model()
    kept = LanceTrainingData(store, "photos", model, ["s00", "s01"])
    empty = LanceTrainingData(store, "photos", model, [])
    assert len(empty) == 0 and empty.geometry.n_images == 0
    with pytest.raises(ValueError, match="nothing left to train on"):
        mitigate(model, empty, MitigationConfig(steps=1))
    with pytest.raises(ValueError, match="gradient-ascent needs the removed samples"):
        mitigate(model, kept, MitigationConfig(method="gradient-ascent", steps=1),
                 removed_images=empty)  # fmt: skip


@pytest.mark.parametrize("latent", [False, True])
def test_a_checkpoint_trained_on_tensors_resumes_on_streamed_rows(store, tmp_path, latent):
    """Checkpoints from before streaming name their data by the tensors' hash; the streamed
    rows recompute it, so such a run resumes, bit-exactly, instead of being refused."""
    base = tiny_sd_pipeline(tmp_path / "sd") if latent else _pixel_model()
    config = CONFIG.model_copy(update={"caption_dropout": 0.3 if latent else 0.0})
    uncond = base.text_encoder.encode([""]) if latent else None
    prepared = load_inputs(store, "photos", base)
    cond = base.text_encoder.encode(prepared.captions) if latent else None
    straight = copy.deepcopy(base)
    train(straight, prepared.x0, config, progress=False, conditioning=cond, unconditional=uncond)
    resumed, ck = copy.deepcopy(base), tmp_path / "ck"
    train(resumed, prepared.x0, config.model_copy(update={"steps": 3}), ck, progress=False,
          conditioning=cond, unconditional=uncond)  # fmt: skip
    rows = LanceTrainingData(store, "photos", resumed, None)
    assert rows.tensor_fingerprint(uncond if latent else None) != rows.fingerprint()
    result = train(resumed, rows, config, ck, progress=False, unconditional=uncond)
    assert result.start_step == 3
    _assert_same_weights(resumed, straight)
