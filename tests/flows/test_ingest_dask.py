"""Ingest on a local Dask cluster: shards decoded by worker processes, one of them SIGKILLed
mid-shard; the run must still end with exactly one row per record, equal to the flow alone."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest

from diffcurate.config import IngestSettings
from diffcurate.demo.writers import SampleFile, write_webdataset
from diffcurate.flows.ingest import IngestParams, ingest_flow
from diffcurate.flows.sharded import DaskOptions, local_cluster
from diffcurate.ingest.records import sample_id_for
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from imagebytes import jpeg_bytes

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_IMAGES = 96
RUN_SPECIFIC = {"source", "ingest_run_id", "ingested_at"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """96 distinct 512-px JPEG crops of scikit-image photos (about 10 ms each to decode and
    hash, so a shard of 6 lasts long enough to be killed in), as WebDataset shards."""
    from PIL import Image
    from skimage import data, transform

    rng = np.random.default_rng(0)
    bases = [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
    files = []
    for k in range(N_IMAGES):
        img = bases[k % len(bases)]
        side = int(rng.integers(200, min(img.shape[:2])))
        y, x = (int(rng.integers(0, d - side + 1)) for d in img.shape[:2])
        crop = transform.resize(img[y : y + side, x : x + side], (512, 512), preserve_range=True)
        pixels = np.asarray(Image.fromarray(crop.astype(np.uint8)))
        files.append(SampleFile(f"p{k:03d}", jpeg_bytes(pixels), "jpg", f"photo {k}", {"k": k}))
    root = tmp_path_factory.mktemp("dask-ingest")
    write_webdataset(files, root / "wds", shard_size=32)
    return root / "wds", files


def params(source, ws, **kw) -> IngestParams:
    return IngestParams(source=source, dataset="d", workspace=ws, progress=False,
                        ingest=IngestSettings(batch_size=6), **kw)  # fmt: skip


def contents(ws) -> dict[str, dict]:
    rows = LanceStore(str(ws / "lancedb")).read("samples").to_pylist()
    counts = Counter(r["sample_id"] for r in rows)
    assert set(counts.values()) == {1}, "a record was stored more than once"
    return {r["sample_id"]: {c: v for c, v in r.items() if c not in RUN_SPECIFIC} for r in rows}


@contextlib.contextmanager
def killing_a_busy_worker(client, store: LanceStore):
    """While the block runs, SIGKILL one worker mid-task once the flow has committed a shard;
    yields a dict describing the kill (pid, keys it was processing, rows stored before)."""
    killed: dict[str, object] = {}
    stop = threading.Event()

    def kill_once() -> None:
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            if store.has_table("samples") and store.count("samples") > 0:
                for address, keys in client.processing().items():
                    if keys:
                        pid = client.run(os.getpid, workers=[address])[address]
                        killed.update(pid=pid, keys=list(keys), rows=store.count("samples"))
                        os.kill(pid, signal.SIGKILL)
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join(timeout=10)


@pytest.mark.slow
def test_killed_dask_worker_mid_shard_still_stores_each_record_once(photos, tmp_path):
    from distributed import Client

    source, files = photos
    local = ingest_flow(params(source, tmp_path / "local"))
    reference = contents(tmp_path / "local")
    assert local.ingested == len(reference) == N_IMAGES
    ws = tmp_path / "dask"
    store = LanceStore(str(ws / "lancedb"))
    with (
        local_cluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as lc,
        Client(lc, set_as_default=False) as client,
    ):  # fmt: skip
        client.wait_for_workers(2, timeout=120)
        with killing_a_busy_worker(client, store) as killed:
            summary = ingest_flow(
                params(source, ws, runner="dask", dask=DaskOptions(address=lc.scheduler_address))
            )
        assert killed, "the run ended before a worker could be killed mid-shard"
        assert killed["keys"] and 0 < killed["rows"] < N_IMAGES  # type: ignore[operator]
        assert killed["pid"] not in client.run(os.getpid).values()  # it really died
    got = contents(ws)
    assert got == reference
    assert set(got) == {sample_id_for("d", f.key) for f in files}
    assert (summary.runner, summary.ingested, summary.quarantined) == ("dask", N_IMAGES, 0)
    assert summary.workers >= 1
    run = Ledger(ws / "ledger.duckdb").run(summary.run_id)
    assert run.status == "completed" and run.stats["ingested"] == N_IMAGES


@pytest.mark.slow
def test_temporary_dask_cluster_gives_the_same_rows(photos, tmp_path):
    source, _ = photos
    ingest_flow(params(source, tmp_path / "local"))
    summary = ingest_flow(params(source, tmp_path / "dask", runner="dask",
                                 dask=DaskOptions(n_workers=2)))  # fmt: skip
    assert summary.ingested == N_IMAGES and summary.lost_shards == 0
    assert summary.workers == 2
    assert contents(tmp_path / "dask") == contents(tmp_path / "local")
