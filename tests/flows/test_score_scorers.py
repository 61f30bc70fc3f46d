"""The issue-4 scorers through the score flow: every row equals a direct library call on the
same images with the same dataset-level state, whatever the shard size."""

import json

import numpy as np
import pytest

import diffcurate.flows.score as score_module
from diffcurate.config import IngestSettings
from diffcurate.demo.writers import write_manifest
from diffcurate.flows.ingest import IngestParams, ingest_flow
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.influence.bif import bif_risk
from diffcurate.influence.clip_knn import clip_knn_risk
from diffcurate.influence.dmin import sketch_gradients
from diffcurate.influence.ekfac import ekfac_self_influence
from diffcurate.influence.global_hessian import global_hessian_risk
from diffcurate.influence.random_baseline import RandomConfig, random_risk
from diffcurate.influence.registry import (
    BIFOptions,
    ClipKNNOptions,
    DMinOptions,
    EKFACOptions,
    GlobalHessianOptions,
    ScorerSpec,
    TRAKOptions,
    fit_sample,
)
from diffcurate.influence.trak import fisher_kernel, trak_features, trak_risk
from diffcurate.models.images import load_training_images
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.sketches import SketchStore
from diffcurate.tasks.score import MissingEmbeddingsError
from tiny_unets import scheduler, tiny_unet
from workspaces import ingest_samples, save_tiny_unet_model

pytestmark = pytest.mark.usefixtures("prefect_harness")

N = 30
FIT = 12  # < N: the fit set is a proper seeded sample of the dataset


@pytest.fixture(scope="module")
def ws(tmp_path_factory, digit_files):
    """30 ingested digits (no CLIP embeddings) and a saved tiny UNet (float32 weights)."""
    root = tmp_path_factory.mktemp("scorers")
    ws = ingest_samples(root, digit_files[:N])
    return ws, save_tiny_unet_model(root / "model")


def run(ws, spec, model_dir=None, **kw):
    params = ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                         progress=False, **kw)  # fmt: skip
    return score_flow(params)


def rows_of(ws, run_id) -> dict[str, dict]:
    t = LanceStore(str(ws / "lancedb")).read("scores", where={"run_id": run_id}).to_pylist()
    assert len(t) == len({r["sample_id"] for r in t})
    return {r["sample_id"]: r for r in t}


def images(ws, ids=None):
    loaded = load_training_images(
        LanceStore(str(ws / "lancedb")), "digits", channels=1, size=8, sample_ids=ids
    )
    order = sorted(range(len(loaded.sample_ids)), key=lambda i: loaded.sample_ids[i])
    if ids is not None:
        return loaded.sample_ids, loaded.pixels
    return [loaded.sample_ids[i] for i in order], loaded.pixels[order]


def model():
    return tiny_unet().float()


def assert_rows_equal(got, ids, want, rtol):
    assert sorted(got) == sorted(ids)
    np.testing.assert_allclose([got[i]["score"] for i in ids], want.score, rtol=rtol)
    assert {got[i]["method"] for i in ids} == {want.method}


def test_fit_sample_is_seeded_order_free_and_the_whole_set_when_small():
    ids = [f"s{i:03d}" for i in range(100)]
    a = fit_sample(ids, 10, seed=0)
    assert len(a) == 10 and a == sorted(a) and set(a) <= set(ids)
    assert fit_sample(list(reversed(ids)), 10, seed=0) == a
    assert fit_sample(ids, 10, seed=1) != a
    assert fit_sample(ids[:7], 10, seed=0) == ids[:7]


def test_ekfac_rows_equal_a_direct_call_and_do_not_depend_on_shards(ws):
    ws, model_dir = ws
    spec = ScorerSpec(signal="ekfac", dtype="float64", fit_size=FIT, seed=3, draws_per_timestep=1,
                      ekfac=EKFACOptions(damping=1e-3))  # fmt: skip
    a = run(ws, spec, model_dir, shard_size=16, resume=False)
    assert (a.samples, a.scored, a.fit_size) == (N, N, FIT)
    assert a.method.startswith("ekfac/self-influence") and a.timesteps == [20]
    got = rows_of(ws, a.run_id)
    ids, x = images(ws)
    fit_ids = fit_sample(ids, FIT, 3)
    _, fit_x = images(ws, fit_ids)
    want = ekfac_self_influence(
        spec.objective(scheduler()), model(), x, ids, spec.ekfac_config,
        fit_images=fit_x, fit_keys=fit_ids,
    )  # fmt: skip
    assert_rows_equal(got, ids, want, rtol=1e-7)
    assert all(
        abs(sum(got[i]["per_layer"]) - got[i]["score"]) < 1e-9 * got[i]["score"] for i in ids
    )
    # Shard-size invariance (up to float64 round-off of kronfluence's batching), and the
    # factors were fitted once for both runs.
    b = rows_of(ws, run(ws, spec, model_dir, shard_size=N, resume=False).run_id)
    np.testing.assert_allclose([b[i]["score"] for i in ids], want.score, rtol=1e-10)
    assert len(list((ws / "cache" / "ekfac").glob("*/factors_*"))) == 1


@pytest.mark.parametrize("states", ["stored", "replay"])
def test_bif_rows_equal_a_direct_call_with_the_same_sgld_set(ws, states):
    ws, model_dir = ws
    spec = ScorerSpec(
        signal="bif", dtype="float64", fit_size=FIT, draws_per_timestep=1,
        bif=BIFOptions(chains=2, draws=6, batch_size=4, step_size=1e-4, states=states),
    )  # fmt: skip
    summary = run(ws, spec, model_dir, shard_size=8, resume=False)
    assert summary.scored == N and summary.method.startswith("bif/posterior-loss-variance")
    got = rows_of(ws, summary.run_id)
    ids, x = images(ws)
    fit_ids = fit_sample(ids, FIT, 0)
    _, fit_x = images(ws, fit_ids)
    want = bif_risk(
        spec.objective(scheduler()), model(), x, ids, spec.bif_config,
        sgld_images=fit_x, sgld_keys=fit_ids,
    )  # fmt: skip
    assert_rows_equal(got, ids, want, rtol=1e-9)
    np.testing.assert_allclose([got[i]["stderr"] for i in ids], want.stderr, rtol=1e-9)
    assert np.ptp(want.score) > 0
    # The chains were recorded once (states, or only their digests) and reused by a second run.
    folder, name = ("bif", "states.npy") if states == "stored" else ("bif-replay", "digests.npy")
    files = list((ws / "cache" / folder).glob(f"*/{name}"))
    assert len(files) == 1 and np.load(files[0]).shape[0] == 2 * 6
    again = rows_of(ws, run(ws, spec, model_dir, shard_size=N, resume=False).run_id)
    assert all((again[i]["score"], again[i]["stderr"]) == (got[i]["score"], got[i]["stderr"])
               for i in ids)  # fmt: skip
    assert len(list((ws / "cache" / folder).glob(f"*/{name}"))) == 1
    # The ledger records the shared state's size: C·T·d numbers only when states are stored.
    stats = Ledger(ws / "ledger.duckdb").runs(kind="score")[0].stats
    d = sum(p.numel() for p in model().parameters())
    states_bytes = 2 * 6 * d * 8
    assert stats["state_disk_bytes"] > fit_x.nbytes
    assert (stats["state_disk_bytes"] > states_bytes) == (states == "stored")
    assert stats["state_memory_bytes"] > fit_x.nbytes


@pytest.mark.parametrize("signal", ["trak", "d-trak"])
def test_trak_rows_equal_a_direct_call_with_the_fit_set_kernel(ws, signal):
    ws, model_dir = ws
    spec = ScorerSpec(signal=signal, dtype="float64", fit_size=FIT, trak=TRAKOptions(proj_dim=64))
    summary = run(ws, spec, model_dir, shard_size=9, resume=False)
    got = rows_of(ws, summary.run_id)
    ids, x = images(ws)
    fit_ids = fit_sample(ids, FIT, 0)
    _, fit_x = images(ws, fit_ids)
    obj, cfg = spec.objective(scheduler()), spec.trak_config
    assert cfg.measurement == ("square" if signal == "d-trak" else "loss")
    kernel = fisher_kernel(trak_features(obj, model(), fit_x, fit_ids, cfg)) * (N / FIT)
    want = trak_risk(obj, model(), x, ids, cfg, kernel=kernel)
    assert_rows_equal(got, ids, want, rtol=1e-7)


def test_global_hessian_batches_span_shards(ws):
    ws, model_dir = ws
    spec = ScorerSpec(signal="global-hessian", dtype="float64", draws_per_timestep=1,
                      global_hessian=GlobalHessianOptions(batch_size=4, probes=1))  # fmt: skip
    summary = run(ws, spec, model_dir, shard_size=5, resume=False)
    got = rows_of(ws, summary.run_id)
    ids, x = images(ws)
    # Direct call on the whole dataset: its minibatches are the flow's, although the flow's
    # shards (of >= 5 samples, cut at batch boundaries) each hold only one or two batches.
    want = global_hessian_risk(spec.objective(scheduler()), model(), x, ids,
                               spec.global_hessian_config)  # fmt: skip
    assert_rows_equal(got, ids, want, rtol=1e-9)
    assert len({round(got[i]["score"], 12) for i in ids}) == 8  # ceil(30 / 4) batches


def test_random_needs_no_model_and_is_keyed_by_id(ws):
    ws, _ = ws
    summary = run(ws, ScorerSpec(signal="random", seed=5), shard_size=7)
    got = rows_of(ws, summary.run_id)
    ids, _ = images(ws)
    want = random_risk(ids, RandomConfig(seed=5))
    assert_rows_equal(got, ids, want, rtol=0)
    with pytest.raises(ValueError, match="needs a model directory"):
        ScoreParams(dataset="digits", scorer=ScorerSpec(signal="loss"), workspace=ws)


def test_clip_knn_refuses_a_dataset_without_embeddings(ws):
    ws, _ = ws
    with pytest.raises(MissingEmbeddingsError, match=r"30 of 30 samples .* have none"):
        run(ws, ScorerSpec(signal="clip-knn"), resume=False)
    assert Ledger(ws / "ledger.duckdb").runs(kind="score")[0].status == "failed"


def test_clip_knn_counts_near_duplicates_over_the_whole_dataset(tmp_path, digit_files, tiny_clip):
    write_manifest(digit_files, tmp_path / "m.parquet")  # 60 digits + 3 copies of digit 5
    ws = tmp_path / "ws"
    ingest_flow(
        IngestParams(source=tmp_path / "m.parquet", dataset="digits", workspace=ws,
                     clip=tiny_clip, ingest=IngestSettings(), progress=False)
    )  # fmt: skip
    spec = ScorerSpec(signal="clip-knn", clip_knn=ClipKNNOptions(tau=0.999999))
    summary = run(ws, spec, shard_size=10)
    got = rows_of(ws, summary.run_id)
    rows = LanceStore(str(ws / "lancedb")).read("samples", "digits").to_pylist()
    rows.sort(key=lambda r: r["sample_id"])
    ids = [r["sample_id"] for r in rows]
    emb = np.array([r["image_embedding"] for r in rows])
    want = clip_knn_risk(ids, emb, spec.clip_knn_config)
    assert_rows_equal(got, ids, want, rtol=0)
    by_key = {r["key"]: got[r["sample_id"]]["score"] for r in rows}
    base5 = digit_files[5].key
    # The 4 byte-identical copies (ingest keeps duplicates) see each other: 3 others each.
    assert [by_key[k] for k in (base5, "dup-0", "dup-1", "dup-2")] == [3.0] * 4
    # Secret mode: the secret's k nearest neighbours are flagged.
    knn = ClipKNNOptions(mode="secret-knn", k=4, secrets=("dup-0",))
    secret = ScorerSpec(signal="clip-knn", clip_knn=knn)
    got = rows_of(ws, run(ws, secret).run_id)
    flagged = {r["key"] for r in rows if got[r["sample_id"]]["score"] > 0}
    assert flagged == {base5, "dup-0", "dup-1", "dup-2"}


def test_dmin_writes_sketches_resumably_and_builds_the_index(ws, monkeypatch):
    ws, model_dir = ws
    spec = ScorerSpec(signal="dmin", draws_per_timestep=1,
                      dmin=DMinOptions(sketch_dim=32, n_timesteps=3))  # fmt: skip
    real = score_module.sketch_shard
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker died")
        return real(*args, **kwargs)

    monkeypatch.setattr(score_module, "sketch_shard", crash_on_second)
    with pytest.raises(RuntimeError, match="worker died"):
        run(ws, spec, model_dir, shard_size=10)
    monkeypatch.setattr(score_module, "sketch_shard", real)
    failed = Ledger(ws / "ledger.duckdb").runs(kind="score")[0]
    store = SketchStore(str(ws / "lancedb"))
    assert failed.status == "failed" and store.count(failed.run_id) == 10
    summary = run(ws, spec, model_dir, shard_size=10)
    assert summary.resumed and (summary.already_scored, summary.scored) == (10, 20)
    assert summary.timesteps == [166, 500, 833] and summary.sketch_index == "ivf_hnsw_sq"
    assert store.count(summary.run_id) == N and store.has_index()
    assert not rows_of(ws, summary.run_id)  # sketches only: no risk scores
    got_ids, got = store.read(summary.run_id)
    ids, x = images(ws)
    want = sketch_gradients(spec.objective(scheduler()), model(), x, ids, spec.dmin_config)
    order = [got_ids.index(i) for i in ids]
    np.testing.assert_allclose(got[order], want.reshape(N, -1).numpy(), rtol=1e-5, atol=1e-6)
    stats = Ledger(ws / "ledger.duckdb").run(summary.run_id).stats
    assert stats["sketch_table"] == "sketches"


def test_spec_validation_and_fingerprint_scope():
    with pytest.raises(ValueError, match="needs secrets"):
        ClipKNNOptions(mode="secret-max")
    with pytest.raises(ValueError, match="timesteps do not apply"):
        ScorerSpec(signal="random", timesteps=(5,))
    # Options of other scorers do not change a scorer's identity (so resumption still works).
    base = ScorerSpec(signal="loss").fingerprint_payload()
    other = ScorerSpec(signal="loss", ekfac=EKFACOptions(damping=0.5), fit_size=3)
    assert other.fingerprint_payload() == base
    assert "ekfac" not in json.dumps(base) and "fit_size" not in base
    ek = ScorerSpec(signal="ekfac")
    assert (
        ek.fingerprint_payload()
        != ScorerSpec(signal="ekfac", ekfac=EKFACOptions(damping=0.5)).fingerprint_payload()
    )
    with pytest.raises(ValueError, match="attribution method"):
        from diffcurate.influence.registry import score_function

        score_function(ScorerSpec(signal="dmin"))
