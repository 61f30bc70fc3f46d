"""`diffcurate score --scorer ...` for the model-free and sketching scorers, and its refusals."""

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.demo.writers import write_folder
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.sketches import SketchStore
from tiny_unets import scheduler, tiny_unet

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_score_scorers_from_the_command_line(tmp_path, digit_files):
    write_folder(digit_files[:12], tmp_path / "src")
    ws = tmp_path / "ws"
    assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
    # random needs no model; its scores are written like any other scorer's.
    res = invoke("score", "-d", "digits", "--scorer", "random", "-w", ws)
    assert res.exit_code == 0, res.output
    assert "random (random/keyed-uniform/seed0)" in res.output and "riskiest 10" in res.output
    assert LanceStore(str(ws / "lancedb")).count("scores") == 12
    # A model-based scorer without --model, an unknown scorer, clip-knn without embeddings.
    res = invoke("score", "-d", "digits", "--scorer", "ekfac", "-w", ws)
    assert res.exit_code == 2 and "needs a model directory" in res.output
    res = invoke("score", "-d", "digits", "--scorer", "nope", "-w", ws)
    assert res.exit_code == 2 and "dmin" in res.output  # the error lists the valid scorers
    res = invoke("score", "-d", "digits", "--scorer", "clip-knn", "-w", ws)
    assert res.exit_code == 2 and "configure clip.checkpoint" in res.output
    res = invoke("score", "-d", "digits", "--scorer", "clip-knn", "--knn-mode", "secret-max",
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 2 and "needs secrets" in res.output
    # dmin stores sketches and says how to query them.
    model = tmp_path / "model"
    tiny_unet().float().save_pretrained(model / "unet")
    scheduler().save_pretrained(model / "scheduler")
    res = invoke("score", "-d", "digits", "-m", model, "--scorer", "dmin", "--sketch-dim", 16,
                 "--sketch-timesteps", 2, "--draws", 1, "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "sketched now" in res.output and "diffcurate attribute IMAGE" in res.output
    assert SketchStore(str(ws / "lancedb")).count() == 12


@pytest.mark.slow
def test_score_on_a_dask_cluster_from_the_command_line(tmp_path, digit_files):
    """`--runner dask` scores on a temporary local cluster; its rows equal the local runner's."""
    write_folder(digit_files[:12], tmp_path / "src")
    rows = {}
    for name in ("local", "dask"):
        ws = tmp_path / name
        assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
        res = invoke("score", "-d", "digits", "--scorer", "random", "--runner", name,
                     "--dask-workers", 1, "--shard-size", 5, "-w", ws)  # fmt: skip
        assert res.exit_code == 0, res.output
        table = LanceStore(str(ws / "lancedb")).read("scores", columns=["sample_id", "score"])
        rows[name] = dict(zip(*table.to_pydict().values(), strict=True))
    assert len(rows["dask"]) == 12 and rows["dask"] == rows["local"]
    ws = tmp_path / "dask"
    model = tmp_path / "model"
    tiny_unet().float().save_pretrained(model / "unet")
    scheduler().save_pretrained(model / "scheduler")
    res = invoke("score", "-d", "digits", "--scorer", "dmin", "-m", model, "--runner", "dask",
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 2 and "runner='dask' shards risk scorers" in res.output
    res = invoke("score", "-d", "digits", "--scorer", "random", "--runner", "ray", "-w", ws)
    assert res.exit_code == 2 and "runner" in res.output
