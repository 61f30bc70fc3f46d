"""The score flow end to end: ingested digits → a saved tiny UNet → scores in LanceDB."""

import numpy as np
import pytest
import torch

import diffcurate.flows.score as score_module
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.influence.registry import ScorerSpec, score_function
from diffcurate.models.diffusion import (
    DiffusionModel,
    ModelLoadError,
    save_diffusion_model,
)
from diffcurate.models.images import load_training_images
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from tiny_unets import scheduler, tiny_cond_unet, tiny_text_encoder, tiny_unet
from workspaces import ingest_samples, save_tiny_unet_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def scored_workspace(tmp_path_factory, digit_files):
    """A workspace with 30 ingested digits and a saved tiny UNet (float32)."""
    root = tmp_path_factory.mktemp("score")
    ws = ingest_samples(root, digit_files[:30])
    return ws, save_tiny_unet_model(root / "model")


def run(ws, model_dir, spec, **kw):
    params = ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                         progress=False, **kw)  # fmt: skip
    return score_flow(params)


def scores_of(ws, run_id) -> dict[str, float]:
    t = LanceStore(str(ws / "lancedb")).read("scores", where={"run_id": run_id})
    ids = t.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids))
    return dict(zip(ids, t.column("score").to_pylist(), strict=True))


def test_flow_scores_equal_a_direct_computation(scored_workspace):
    ws, model_dir = scored_workspace
    spec = ScorerSpec(signal="trace", probes=2, dtype="float64")
    summary = run(ws, model_dir, spec, shard_size=8)
    assert (summary.samples, summary.scored, summary.already_scored) == (30, 30, 0)
    assert summary.timesteps == [20] and summary.method.startswith("ggn/hutchinson")
    got = scores_of(ws, summary.run_id)
    # Recompute directly with the influence API on the same decoded images.
    store = LanceStore(str(ws / "lancedb"))
    loaded = load_training_images(store, "digits", channels=1, size=8)
    ids, x = loaded.sample_ids, loaded.pixels
    sched = scheduler()
    want = score_function(spec)(spec.objective(sched), tiny_unet().float(), x, ids, None)
    np.testing.assert_allclose([got[i] for i in ids], want.score, rtol=1e-9)
    rows = store.read("scores", where={"run_id": summary.run_id}).to_pylist()
    assert all(len(r["per_layer"]) == len(summary.layer_names) for r in rows)
    assert all(abs(sum(r["per_layer"]) - r["score"]) < 1e-9 * abs(r["score"]) for r in rows)
    run_row = Ledger(ws / "ledger.duckdb").run(summary.run_id)
    assert run_row.status == "completed" and run_row.stats["scored"] == 30


def test_shard_size_does_not_change_scores(scored_workspace):
    ws, model_dir = scored_workspace
    # float64: float32 batches of other sizes round differently (~1e-7) on some thread counts;
    # a sample's own keyed draws are what must not depend on the shard.
    spec = ScorerSpec(signal="loss", seed=7, dtype="float64")
    a = run(ws, model_dir, spec, shard_size=4, resume=False)
    b = run(ws, model_dir, spec, shard_size=64, resume=False)
    assert a.run_id != b.run_id
    sa, sb = scores_of(ws, a.run_id), scores_of(ws, b.run_id)
    assert sa.keys() == sb.keys()
    np.testing.assert_allclose([sa[k] for k in sa], [sb[k] for k in sa], rtol=1e-12)


def test_failed_run_resumes_without_duplicates_or_drift(scored_workspace, monkeypatch):
    ws, model_dir = scored_workspace
    # float64: in float32, vmapped chunks of different sizes round differently (~1e-6).
    spec = ScorerSpec(signal="divergence", probes=2, seed=11, dtype="float64")
    calls = {"n": 0}
    real = score_module.score_shard

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker died")
        return real(*args, **kwargs)

    monkeypatch.setattr(score_module, "score_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="worker died"):
        run(ws, model_dir, spec, shard_size=5)
    monkeypatch.setattr(score_module, "score_shard", real)
    ledger = Ledger(ws / "ledger.duckdb")
    failed = ledger.runs(kind="score")[0]
    assert failed.status == "failed"
    partial = scores_of(ws, failed.run_id)
    assert len(partial) == 10  # two shards committed before the crash
    resumed = run(ws, model_dir, spec, shard_size=5)
    assert resumed.resumed and resumed.run_id == failed.run_id
    assert (resumed.already_scored, resumed.scored) == (10, 20)
    final = scores_of(ws, resumed.run_id)
    assert len(final) == 30 and all(final[k] == v for k, v in partial.items())
    fresh = scores_of(ws, run(ws, model_dir, spec, shard_size=30, resume=False).run_id)
    assert fresh.keys() == final.keys()
    np.testing.assert_allclose([fresh[k] for k in final], list(final.values()), rtol=1e-10)


def test_missing_model_and_empty_dataset_are_clear_errors(scored_workspace, tmp_path):
    ws, model_dir = scored_workspace
    with pytest.raises(FileNotFoundError, match="model not found"):
        run(ws, tmp_path / "nope", ScorerSpec(signal="loss"))
    with pytest.raises(ValueError, match="has no samples"):
        score_flow(ScoreParams(dataset="empty", model=model_dir, workspace=ws, progress=False))


def test_scores_ignore_torch_global_rng(scored_workspace):
    ws, model_dir = scored_workspace
    spec = ScorerSpec(signal="loss", seed=3)
    torch.manual_seed(1)
    a = run(ws, model_dir, spec, resume=False)
    torch.manual_seed(2)
    b = run(ws, model_dir, spec, resume=False)
    assert scores_of(ws, a.run_id) == scores_of(ws, b.run_id)


@pytest.fixture(scope="module")
def conditional_model(tmp_path_factory):
    """A saved text-to-image pipeline: tiny conditional UNet + its own CLIP text encoder."""
    root = tmp_path_factory.mktemp("cond")
    model = DiffusionModel(
        unet=tiny_cond_unet(cross_dim=6).float(),
        scheduler=scheduler(),
        text_encoder=tiny_text_encoder(root / "vocab", hidden=6),
    )
    return model, save_diffusion_model(model, root / "pipe")


@pytest.mark.parametrize("signal", ["loss", "cond-gap"])
def test_conditional_model_is_scored_on_its_captions(scored_workspace, conditional_model, signal):
    ws, _ = scored_workspace
    model, path = conditional_model
    spec = ScorerSpec(signal=signal, generations=2, inference_steps=10)
    summary = run(ws, path, spec, shard_size=16, resume=False)
    got = scores_of(ws, summary.run_id)
    store = LanceStore(str(ws / "lancedb"))
    loaded = load_training_images(store, "digits", channels=1, size=8)
    ids = loaded.sample_ids
    by_id = {r["sample_id"]: r["caption"] for r in store.read("samples", "digits").to_pylist()}
    cond = model.text_encoder.encode([by_id[i] for i in ids])
    uncond = model.text_encoder.encode([""])
    want = score_function(spec)(
        spec.objective(model.scheduler), model.unet, loaded.pixels, ids, cond, uncond
    )
    np.testing.assert_allclose([got[i] for i in ids], want.score, rtol=1e-5)
    if signal == "cond-gap":
        # Same caption ⇒ same score: the signal belongs to the caption, not the pixels.
        by_caption: dict[str, set[float]] = {}
        for i in ids:
            by_caption.setdefault(by_id[i], set()).add(round(got[i], 6))
        assert all(len(v) == 1 for v in by_caption.values())


def test_conditional_signal_refuses_unconditional_models(scored_workspace):
    ws, model_dir = scored_workspace
    with pytest.raises(ValueError, match="needs a text-conditional model"):
        run(ws, model_dir, ScorerSpec(signal="cond-gap"), resume=False)


def test_conditional_model_without_text_encoder_is_refused(scored_workspace, tmp_path):
    ws, _ = scored_workspace
    path = save_diffusion_model(
        DiffusionModel(unet=tiny_cond_unet().float(), scheduler=scheduler()), tmp_path / "m"
    )
    with pytest.raises(ModelLoadError, match="no text_encoder/ and tokenizer/"):
        run(ws, path, ScorerSpec(signal="loss"), resume=False)
