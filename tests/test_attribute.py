"""`diffcurate attribute`: a training image queried against its own training set comes out top-1
(DMin, indexed and exact), and EK-FAC / TRAK / BIF rankings equal direct library calls."""

import numpy as np
import pytest
from typer.testing import CliRunner

from diffcurate.attribution import AttributionError, attribute_image, query_key
from diffcurate.cli import app
from diffcurate.config import ClipSettings, IngestSettings
from diffcurate.demo.writers import write_folder
from diffcurate.flows.ingest import IngestParams, ingest_flow
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.influence.bif import bif_attribution
from diffcurate.influence.ekfac import ekfac_attribution
from diffcurate.influence.registry import (
    BIFOptions,
    DMinOptions,
    EKFACOptions,
    ScorerSpec,
    TRAKOptions,
    fit_sample,
)
from diffcurate.influence.trak import fisher_kernel, trak_features, trak_scores
from diffcurate.models.images import load_training_images
from diffcurate.storage.lance_store import LanceStore
from tiny_unets import scheduler, tiny_unet

pytestmark = pytest.mark.usefixtures("prefect_harness")

N = 30
QUERY = 7  # index of the training image used as the query


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digit_files):
    """30 digits ingested from image files, a saved tiny UNet and a dmin sketch run."""
    root = tmp_path_factory.mktemp("attribute")
    src = write_folder(digit_files[:N], root / "src")
    ws = root / "ws"
    ingest_flow(
        IngestParams(source=src, dataset="digits", workspace=ws, clip=ClipSettings(),
                     ingest=IngestSettings(), progress=False)
    )  # fmt: skip
    model_dir = root / "model"
    tiny_unet().float().save_pretrained(model_dir / "unet")
    scheduler().save_pretrained(model_dir / "scheduler")
    spec = ScorerSpec(signal="dmin", draws_per_timestep=1,
                      dmin=DMinOptions(sketch_dim=64, n_timesteps=3))  # fmt: skip
    params = ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                         shard_size=8, progress=False)  # fmt: skip
    dmin_run = score_flow(params).run_id
    sample = digit_files[QUERY]
    query = src / f"{sample.key}.{sample.ext}"
    samples = LanceStore(str(ws / "lancedb")).read("samples", "digits").to_pylist()
    query_id = next(r["sample_id"] for r in samples if r["key"] == sample.key)
    return ws, model_dir, query, query_id, dmin_run


@pytest.mark.parametrize("exact", [False, True])
def test_dmin_finds_the_query_image_itself(setup, exact):
    ws, model_dir, query, query_id, dmin_run = setup
    res = attribute_image(ws, query, model_dir, top_k=5, exact=exact)
    assert res.run_id == dmin_run and res.searched == N and len(res.rows) == 5
    assert res.sample_ids[0] == query_id
    # Identical gradients at each of the 3 timesteps: the inner product of the concatenated
    # unit-norm sketches is ~3 (JL error at v=64), and clearly ahead of the runner-up.
    assert res.scores[0] == pytest.approx(3.0, abs=0.5 if not exact else 1.5)
    assert res.scores[0] > res.scores[1]
    assert list(res.scores) == sorted(res.scores, reverse=True)


def test_cli_prints_the_top_k_and_refuses_clearly(setup, tmp_path):
    ws, model_dir, query, query_id, dmin_run = setup
    runner = CliRunner()
    res = runner.invoke(app, ["attribute", str(query), "--model", str(model_dir), "--top-k", "3",
                              "--run", dmin_run, "-w", str(ws)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "dmin (ANN index)" in res.output and query_id in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip().startswith("│ 1 ")]
    assert lines and query_id in lines[0]
    # Another model's files: the sketches are not comparable.
    other = tmp_path / "other"
    tiny_unet(seed=1).float().save_pretrained(other / "unet")
    scheduler().save_pretrained(other / "scheduler")
    res = runner.invoke(app, ["attribute", str(query), "-m", str(other), "--run", dmin_run,
                              "-w", str(ws)])  # fmt: skip
    assert res.exit_code == 2 and "other model files" in res.output
    res = runner.invoke(app, ["attribute", str(query), "-m", str(other), "-w", str(ws)])
    assert res.exit_code == 2 and "run `diffcurate score --scorer dmin` first" in res.output
    res = runner.invoke(app, ["attribute", str(query), "-m", str(model_dir), "-s", "ekfac",
                              "-w", str(ws)])  # fmt: skip
    assert res.exit_code == 2 and "pass --dataset" in res.output


def _direct_inputs(ws, spec, query):
    store = LanceStore(str(ws / "lancedb"))
    loaded = load_training_images(store, "digits", channels=1, size=8)
    order = sorted(range(N), key=lambda i: loaded.sample_ids[i])
    ids, x = [loaded.sample_ids[i] for i in order], loaded.pixels[order]
    fit_ids = fit_sample(ids, spec.fit_size, spec.seed)
    fit_x = x[[ids.index(i) for i in fit_ids]]
    q = x[[ids.index(query)]]
    return ids, x, fit_ids, fit_x, q


def test_ekfac_attribution_equals_a_direct_ranking(setup):
    ws, model_dir, query, query_id, _ = setup
    spec = ScorerSpec(signal="ekfac", dtype="float64", draws_per_timestep=1, fit_size=12,
                      ekfac=EKFACOptions(damping=1e-3))  # fmt: skip
    run_id = score_flow(ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                                    shard_size=N, progress=False)).run_id  # fmt: skip
    res = attribute_image(ws, query, model_dir, top_k=N, scorer="ekfac", run_id=run_id)
    ids, x, fit_ids, fit_x, q = _direct_inputs(ws, spec, query_id)
    want = ekfac_attribution(
        spec.objective(scheduler()), tiny_unet().float(), x, ids, q,
        [query_key(query.read_bytes())], spec.ekfac_config, fit_images=fit_x, fit_keys=fit_ids,
    )[0]  # fmt: skip
    order = sorted(range(N), key=lambda j: (-want[j], ids[j]))
    assert res.sample_ids == [ids[j] for j in order]
    np.testing.assert_allclose(res.scores, want[order], rtol=1e-8)


def test_trak_attribution_equals_a_direct_ranking(setup):
    ws, model_dir, query, query_id, _ = setup
    spec = ScorerSpec(signal="trak", dtype="float64", draws_per_timestep=1, fit_size=N,
                      trak=TRAKOptions(proj_dim=64))  # fmt: skip
    run_id = score_flow(ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                                    shard_size=N, progress=False)).run_id  # fmt: skip
    res = attribute_image(ws, query, model_dir, top_k=5, scorer="trak", run_id=run_id)
    ids, x, _, _, q = _direct_inputs(ws, spec, query_id)
    obj, cfg, net = spec.objective(scheduler()), spec.trak_config, tiny_unet().float()
    feats = trak_features(obj, net, x, ids, cfg)
    q_feats = trak_features(obj, net, q, [query_key(query.read_bytes())], cfg)
    want = trak_scores(q_feats, feats, fisher_kernel(feats), cfg.damping)[0]
    order = sorted(range(N), key=lambda j: (-want[j], ids[j]))[:5]
    assert res.sample_ids == [ids[j] for j in order]
    np.testing.assert_allclose(res.scores, want[order], rtol=1e-8)


@pytest.mark.parametrize("states", ["stored", "replay"])
def test_bif_attribution_equals_a_direct_ranking(setup, states):
    """Cov = −BIF over the run's posterior draws (its fit set drives the chains), from the
    command line: the same numbers as the library's bif_attribution, for either kind of state."""
    ws, model_dir, query, query_id, _ = setup
    spec = ScorerSpec(signal="bif", dtype="float64", draws_per_timestep=1, fit_size=12,
                      bif=BIFOptions(chains=2, draws=3, batch_size=4, step_size=1e-4,
                                     states=states))  # fmt: skip
    run_id = score_flow(ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                                    shard_size=8, progress=False)).run_id  # fmt: skip
    res = attribute_image(ws, query, model_dir, top_k=N, scorer="bif", run_id=run_id,
                          shard_size=8)  # fmt: skip
    ids, x, fit_ids, fit_x, q = _direct_inputs(ws, spec, query_id)
    want = bif_attribution(
        spec.objective(scheduler()), tiny_unet().float(), x, ids, q,
        [query_key(query.read_bytes())], spec.bif_config, sgld_images=fit_x, sgld_keys=fit_ids,
    ).scores[0]  # fmt: skip
    order = sorted(range(N), key=lambda j: (-want[j], ids[j]))
    assert res.sample_ids == [ids[j] for j in order]
    np.testing.assert_allclose(res.scores, want[order], rtol=1e-8, atol=1e-15)
    cli = CliRunner().invoke(app, ["attribute", str(query), "-m", str(model_dir), "-s", "bif",
                                   "--run", run_id, "-k", "3", "-w", str(ws)])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "bif (exact over the dataset)" in cli.output and ids[order[0]] in cli.output


def test_bad_arguments_are_refused(setup, tmp_path):
    ws, model_dir, query, _, dmin_run = setup
    with pytest.raises(AttributionError, match="unknown scorer"):
        attribute_image(ws, query, model_dir, scorer="loss")
    with pytest.raises(AttributionError, match="is a dmin run, not ekfac"):
        attribute_image(ws, query, model_dir, scorer="ekfac", run_id=dmin_run)
    with pytest.raises(AttributionError, match="cannot read query image"):
        attribute_image(ws, tmp_path / "missing.png", model_dir)
