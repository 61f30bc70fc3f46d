"""LanceDB tables on object storage: settings, the recorded location, and a local S3 server.

The S3 tests start moto's server (an S3-compatible HTTP endpoint) on a free port, so the same
code path a real bucket takes runs here: Lance's object store over HTTP, not a mock of Python
calls. Credentials come from the standard AWS_* variables, as in production.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.config import load_settings
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.schemas import DUPLICATES
from diffcurate.workspace import TablesLocationError, Workspace

BUCKET = "diffcurate-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


# --------------------------------------------------------------------------- settings, no S3
def test_tables_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFCURATE_TABLES__URI", "s3://bucket/prefix")
    monkeypatch.setenv("DIFFCURATE_TABLES__STORAGE_OPTIONS__ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("DIFFCURATE_TABLES__STORAGE_OPTIONS__ALLOW_HTTP", "true")
    layout = load_settings(tmp_path / "ws").layout
    assert layout.lancedb_uri == "s3://bucket/prefix"
    assert layout.lance_storage_options == {"endpoint": "http://127.0.0.1:9", "allow_http": "true"}
    assert layout.ledger_path == tmp_path / "ws" / "ledger.duckdb"


def test_tables_settings_from_toml(monkeypatch, tmp_path):
    toml = tmp_path / "dc.toml"
    toml.write_text(
        '[tables]\nuri = "s3://bucket/t"\n[tables.storage_options]\nregion = "eu-west-1"\n'
    )
    monkeypatch.setenv("DIFFCURATE_CONFIG", str(toml))
    layout = load_settings(tmp_path / "ws").layout
    assert (layout.lancedb_uri, layout.lance_storage_options) == (
        "s3://bucket/t",
        {"region": "eu-west-1"},
    )


def test_default_tables_stay_in_the_workspace(tmp_path):
    layout = load_settings(tmp_path / "ws").layout
    assert layout.lancedb_uri == str(tmp_path / "ws" / "lancedb")
    assert layout.lance_storage_options == {}
    layout.bind_tables()
    assert not layout.tables_file.exists()


def test_credentials_in_storage_options_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFCURATE_TABLES__STORAGE_OPTIONS__AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(ValidationError, match="AWS_SECRET_ACCESS_KEY"):
        load_settings(tmp_path)
    with pytest.raises(ValueError, match="credentials"):
        Workspace(tmp_path, "s3://b/p", {"aws_session_token": "t"})


def test_bound_location_is_what_a_bare_workspace_opens(tmp_path):
    ws = tmp_path / "ws"
    Workspace(ws, "s3://bucket/a", {"region": "eu-west-1"}).bind_tables()
    recorded = json.loads((ws / "tables.json").read_text())
    assert recorded == {"uri": "s3://bucket/a", "storage_options": {"region": "eu-west-1"}}
    # A flow or worker handed only the root opens the same tables with the same options.
    bare = Workspace(ws)
    assert (bare.lancedb_uri, bare.lance_storage_options) == (
        "s3://bucket/a",
        {"region": "eu-west-1"},
    )
    assert bare.resolved().lancedb_uri == "s3://bucket/a"
    # Binding again is idempotent; new options are recorded; another location is refused.
    Workspace(ws, "s3://bucket/a", {"region": "us-east-1"}).bind_tables()
    assert Workspace(ws).lance_storage_options == {"region": "us-east-1"}
    Workspace(ws, None, {"region": "eu-north-1"}).bind_tables()  # options alone
    assert Workspace(ws).lance_storage_options == {"region": "eu-north-1"}
    with pytest.raises(TablesLocationError):  # the default location is another one too
        Workspace(ws, str(ws / "lancedb")).bind_tables()
    with pytest.raises(TablesLocationError, match="s3://bucket/a"):
        Workspace(ws, "s3://bucket/b").bind_tables()
    with pytest.raises(TablesLocationError):
        _ = Workspace(ws, "s3://bucket/b").lancedb_uri


def test_local_tables_are_not_hidden_by_a_new_location(tmp_path):
    ws = tmp_path / "ws"
    LanceStore.open(Workspace(ws)).table("quarantine")
    with pytest.raises(TablesLocationError, match="already holds tables"):
        Workspace(ws, "s3://bucket/a").bind_tables()
    assert not (ws / "tables.json").exists()


def test_tables_in_another_directory(tmp_path):
    ws, elsewhere = tmp_path / "ws", tmp_path / "fast-disk" / "tables"
    Workspace(ws, str(elsewhere)).bind_tables()
    LanceStore.open(Workspace(ws)).table("quarantine")
    assert (elsewhere / "quarantine.lance").is_dir()
    assert not (ws / "lancedb").exists()


def test_cli_refuses_a_second_location_and_datasets_names_the_tables(monkeypatch, tmp_path):
    ws = tmp_path / "ws"
    other = tmp_path / "other"
    runner = CliRunner()
    res = runner.invoke(
        app, ["datasets", "-w", str(ws)], env={"DIFFCURATE_TABLES__URI": str(other)}
    )
    assert res.exit_code == 0, res.output
    assert f"tables: {other}" in res.output
    res = runner.invoke(
        app, ["datasets", "-w", str(ws)], env={"DIFFCURATE_TABLES__URI": str(tmp_path / "x")}
    )
    assert res.exit_code == 2 and "keeps its tables at" in res.output
    # Without the setting, the recorded location is used.
    res = runner.invoke(app, ["datasets", "-w", str(ws)])
    assert res.exit_code == 0 and f"tables: {other}" in res.output


# ------------------------------------------------------------------------- a local S3 server
@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free local port with one bucket; yields (endpoint, client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    server.stop()


def _dups(ids: list[str], dataset: str) -> pa.Table:
    n = len(ids)
    return pa.table({
        "sample_id": ids, "dataset": [dataset] * n, "exact_group": ids,
        "exact_group_size": [1] * n, "near_group": ids, "near_group_size": [1] * n,
        "near_method": ["phash"] * n, "run_id": ["r"] * n,
    }, schema=DUPLICATES)  # fmt: skip


def _options(endpoint: str) -> dict[str, str]:
    return {"endpoint": endpoint, "region": "us-east-1", "allow_http": "true"}


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_store_round_trip_on_s3(s3_server, tmp_path):
    endpoint, client = s3_server
    layout = Workspace(tmp_path / "ws", f"s3://{BUCKET}/unit", _options(endpoint))
    store = LanceStore.open(layout)
    rows = _dups(["a", "b", "c"], "d")
    assert store.insert_new("duplicates", rows) == 3
    assert store.insert_new("duplicates", rows) == 0  # merge_insert: exactly once on S3 too
    assert sorted(store.read("duplicates", "d").column("sample_id").to_pylist()) == ["a", "b", "c"]
    store.replace_dataset_rows("duplicates", "d", _dups(["x"], "d"))
    assert store.count("duplicates") == 1
    sketches = store.sketches()
    vectors = np.eye(4, dtype=np.float32)[:3]
    assert sketches.write("run", "d", ["a", "b", "c"], vectors[:, None, :], [20]) == 3
    assert sketches.top_k(vectors[1], 1, "run", exact=True)[0].sample_ids == ["b"]
    keys = _keys(client, "unit/")
    assert any(k.startswith("unit/duplicates.lance/_versions/") for k in keys)
    assert any(k.startswith("unit/sketches.lance/data/") for k in keys)
    assert not (tmp_path / "ws").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_cli_ingest_into_s3_then_commands_without_the_setting(s3_server, tmp_path, digit_files):
    from diffcurate.demo.writers import SampleFile, write_folder

    endpoint, client = s3_server
    write_folder([*digit_files[:4], SampleFile("bad", b"", "png", "empty")], tmp_path / "src")
    ws, uri = tmp_path / "ws", f"s3://{BUCKET}/cli"
    env = {"DIFFCURATE_TABLES__URI": uri} | {
        f"DIFFCURATE_TABLES__STORAGE_OPTIONS__{k.upper()}": v for k, v in _options(endpoint).items()
    }
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(tmp_path / "src"), "-d", "digits", "-w", str(ws)],
                        env=env)  # fmt: skip
    assert res.exit_code == 0, res.output
    # Later commands name only the workspace: the recorded location and options are used.
    res = runner.invoke(app, ["datasets", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "digits" in line)
    assert [c.strip() for c in row.split("│")][1:4] == ["digits", "4", "1"], row
    assert f"tables: {uri}" in res.output
    assert any(k.startswith("cli/samples.lance/") for k in _keys(client, "cli/"))
    assert any(k.startswith("cli/quarantine.lance/") for k in _keys(client, "cli/"))
    assert not (ws / "lancedb").exists() and (ws / "ledger.duckdb").is_file()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_ingest_score_hygiene_on_an_s3_workspace(s3_server, tmp_path, digit_files):
    from diffcurate.curation.gate import GatePolicy
    from diffcurate.curation.measure import MeasureConfig
    from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
    from diffcurate.flows.score import ScoreParams, score_flow
    from diffcurate.influence.registry import ScorerSpec
    from diffcurate.mitigation import MitigationConfig
    from diffcurate.models.diffusion import save_diffusion_model
    from diffcurate.models.reference import reference_model
    from diffcurate.storage.ledger import Ledger
    from diffcurate.storage.releases import checkout, manifest_ids
    from workspaces import ingest_samples

    endpoint, client = s3_server
    ws = tmp_path / "ws"
    Workspace(ws, f"s3://{BUCKET}/e2e", _options(endpoint)).bind_tables()
    # The flows are given the workspace root only: they find the tables through it.
    ingest_samples(tmp_path, digit_files, ws=ws)
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), tmp_path / "model")
    score = score_flow(ScoreParams(dataset="digits", model=model_dir, workspace=ws,
                                   scorer=ScorerSpec(signal="loss"), progress=False))  # fmt: skip
    assert score.scored == 63
    summary = hygiene_flow(HygieneParams(
        dataset="digits", model=model_dir, workspace=ws, score_run=score.run_id,
        mitigation=MitigationConfig(method="finetune", epochs=1, lr=2e-6, batch_size=16),
        measure=MeasureConfig(generations=8, inference_steps=2, kid_subsets=2, kid_subset_size=4),
        gate=GatePolicy(max_mem_percent_after=100.0), audit_attributes=["stroke"], progress=False,
    ))  # fmt: skip
    assert summary.score_run == score.run_id and summary.n_samples == 63

    # The rows are in the bucket, read back through the workspace.
    store = LanceStore.open(Workspace(ws))
    assert store.count("samples", "digits") == 63
    assert len(store.read("scores", where={"run_id": score.run_id})) == 63
    ledger = Ledger(ws / "ledger.duckdb")
    kept = checkout(store, ledger, summary.release_tag, columns=["sample_id"])
    assert sorted(kept.column("sample_id").to_pylist()) == sorted(
        manifest_ids(ledger, summary.release_tag)["kept"]
    )
    tables = {k.split("/")[1] for k in _keys(client, "e2e/")}
    assert {"samples.lance", "scores.lance", "release_digits.lance"} <= tables
    # Nothing lancedb-ish is local; the ledger is a local DuckDB file holding every run.
    assert not (ws / "lancedb").exists()
    assert not list(ws.rglob("*.lance")) and not list(ws.rglob("_versions"))
    assert (ws / "ledger.duckdb").is_file()
    assert {r.kind for r in ledger.runs()} >= {"ingest", "score", "hygiene"}
    assert ledger.run(summary.run_id).status == "completed"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_dask_shard_tasks_write_to_the_bucket(s3_server, tmp_path, digit_files):
    """Worker processes get the tables' URI and storage options with each shard: without the
    endpoint they would try AWS itself and fail."""
    from diffcurate.flows.score import ScoreParams, score_flow
    from diffcurate.flows.sharded import DaskOptions
    from diffcurate.influence.registry import ScorerSpec
    from workspaces import ingest_samples, save_tiny_unet_model

    endpoint, client = s3_server
    ws = tmp_path / "ws"
    Workspace(ws, f"s3://{BUCKET}/dask", _options(endpoint)).bind_tables()
    ingest_samples(tmp_path, digit_files[:24], ws=ws)
    model_dir = save_tiny_unet_model(tmp_path / "model")
    spec = ScorerSpec(signal="loss", dtype="float64")

    def scores(**kw) -> dict[str, float]:
        params = ScoreParams(dataset="digits", model=model_dir, scorer=spec, workspace=ws,
                             resume=False, progress=False, **kw)  # fmt: skip
        summary = score_flow(params)
        rows = LanceStore.open(Workspace(ws)).read("scores", where={"run_id": summary.run_id})
        return dict(zip(rows.column("sample_id").to_pylist(), rows.column("score").to_pylist(),
                        strict=True))  # fmt: skip

    local = scores()
    sharded = scores(runner="dask", shard_size=6, dask=DaskOptions(n_workers=2))
    assert sharded.keys() == local.keys() and len(local) == 24
    np.testing.assert_allclose([sharded[k] for k in local], list(local.values()), rtol=1e-9)
    assert any(k.startswith("dask/scores.lance/data/") for k in _keys(client, "dask/"))
    assert not (ws / "lancedb").exists()
