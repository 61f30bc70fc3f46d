"""The command line: exit codes, messages, configuration, and a real SIGKILL mid-ingest."""

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.demo.corpus import digit_samples
from diffcurate.demo.writers import SampleFile, write_folder, write_webdataset
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("ingest", "demo-corpus", "runs", "quarantine", "datasets", "config"):
        assert cmd in res.output


def test_unreadable_source_is_refused_with_exit_2(tmp_path):
    res = invoke("ingest", tmp_path / "missing", "--dataset", "d", "-w", tmp_path / "ws")
    assert res.exit_code == 2
    assert "does not exist" in res.output


def test_unknown_format_and_bad_dataset_name_are_refused(tmp_path, digit_files):
    write_folder(digit_files[:2], tmp_path / "src")
    res = invoke("ingest", tmp_path / "src", "-d", "d", "-f", "zip", "-w", tmp_path / "ws")
    assert res.exit_code == 2 and "unknown --format" in res.output
    res = invoke("ingest", tmp_path / "src", "-d", "../x", "-w", tmp_path / "ws")
    assert res.exit_code == 2 and "invalid dataset name" in res.output


def test_malformed_manifest_is_refused(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"garbage")
    res = invoke("ingest", tmp_path / "m.parquet", "-d", "d", "-w", tmp_path / "ws")
    assert res.exit_code == 2 and "malformed parquet" in res.output


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_summary_and_exit_codes(tmp_path, digit_files):
    write_folder([*digit_files[:5], SampleFile("bad", b"", "png", "empty")], tmp_path / "ok")
    ws = tmp_path / "ws"
    res = invoke("ingest", tmp_path / "ok", "-d", "digits", "-w", ws)
    assert res.exit_code == 0, res.output
    assert "embeddings disabled" in res.output
    for line in ("ingested (new)", "empty_file", "exact duplicate groups"):
        assert line in res.output
    # Only bad rows: exit 1, and the rows are still quarantined.
    write_folder([SampleFile("bad2", b"junk", "png", "junk")], tmp_path / "allbad")
    res = invoke("ingest", tmp_path / "allbad", "-d", "junk", "-w", ws)
    assert res.exit_code == 1 and "nothing could be ingested" in res.output
    res = invoke("quarantine", "-w", ws)
    assert "empty_file: 1" in res.output and "not_an_image: 1" in res.output
    res = invoke("datasets", "-w", ws)
    assert "digits" in res.output and "junk" in res.output
    res = invoke("runs", "-w", ws, "--json")
    assert res.exit_code == 0 and res.output.count('"kind": "ingest"') == 2


def test_config_from_env_and_toml_and_clear_errors(tmp_path):
    toml = tmp_path / "dc.toml"
    toml.write_text('[ingest]\nbatch_size = 33\nmin_side = 16\n[clip]\nmodel = "RN50"\n')
    env = {"DIFFCURATE_CONFIG": str(toml), "DIFFCURATE_INGEST__MIN_SIDE": "24"}
    res = invoke("config", "-w", tmp_path / "ws", env=env)
    assert res.exit_code == 0, res.output
    assert '"batch_size": 33' in res.output  # from TOML
    assert '"min_side": 24' in res.output  # env beats TOML
    assert '"model": "RN50"' in res.output
    res = invoke("config", "-w", tmp_path / "ws", env={"DIFFCURATE_INGEST__BATCH_SIZE": "-1"})
    assert res.exit_code == 2 and "batch_size" in res.output
    toml.write_text("[ingest]\nmin_side = 64\nmax_side = 32\n")
    res = invoke("config", "-w", tmp_path / "ws", env={"DIFFCURATE_CONFIG": str(toml)})
    assert res.exit_code == 2 and "exceeds max_side" in res.output


def _versions(ws) -> int:
    d = ws / "lancedb" / "samples.lance" / "_versions"
    return len(list(d.glob("*.manifest"))) if d.exists() else 0


@pytest.mark.slow
def test_sigkill_mid_ingest_then_rerun_ends_with_exact_rows(tmp_path):
    samples, _ = digit_samples(n_duplicated=0, copies=1)  # 1,797 real digits
    write_webdataset(samples, tmp_path / "wds", shard_size=500)
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "diffcurate.cli", "ingest", str(tmp_path / "wds"),
           "-d", "digits", "-w", str(ws), "--batch-size", "10"]  # fmt: skip
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    # Own process group: the kill takes the CLI and the Prefect server it started, as a
    # machine loss or an OOM kill of the job would (and leaves no orphan server behind).
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while _versions(ws) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    store = LanceStore(str(ws / "lancedb"))
    partial = store.count("samples", "digits")
    assert 0 < partial < len(samples), "the kill must land mid-run for this test to mean anything"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = store.read("samples", "digits", columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(samples)
    runs = Ledger(ws / "ledger.duckdb").runs(kind="ingest")
    assert [r.status for r in runs] == ["completed", "interrupted"]
    assert runs[0].stats["already_present"] == partial
    assert runs[0].stats["ingested"] == len(samples) - partial


@pytest.mark.usefixtures("prefect_harness")
def test_score_command_prints_riskiest_and_refuses_bad_input(tmp_path, digit_files):
    from tiny_unets import scheduler, tiny_unet

    write_folder(digit_files[:12], tmp_path / "src")
    ws = tmp_path / "ws"
    assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
    model = tmp_path / "model"
    tiny_unet().float().save_pretrained(model / "unet")
    scheduler().save_pretrained(model / "scheduler")
    res = invoke("score", "-d", "digits", "-m", model, "--scorer", "loss", "-w", ws, "--top", 3)
    assert res.exit_code == 0, res.output
    assert "riskiest 3" in res.output and "t=[100]" in res.output
    run_id = Ledger(ws / "ledger.duckdb").runs(kind="score")[0].run_id
    res = invoke("scores", run_id, "-w", ws, "--top", 5)
    assert res.exit_code == 0 and "riskiest 5" in res.output
    res = invoke("score", "-d", "digits", "-m", model, "--scorer", "bogus", "-w", ws)
    assert res.exit_code == 2 and "signal" in res.output
    res = invoke("score", "-d", "digits", "-m", tmp_path / "nope", "-w", ws)
    assert res.exit_code == 2 and "model not found" in res.output
    res = invoke("score", "-d", "digits", "-m", model, "--timesteps", "5000", "-w", ws)
    assert res.exit_code == 2 and "training timesteps" in res.output


@pytest.mark.usefixtures("prefect_harness")
def test_train_resumes_and_sample_writes_a_grid(tmp_path, digit_files):
    from PIL import Image

    write_folder(digit_files[:12], tmp_path / "src")
    ws = tmp_path / "ws"
    assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
    args = ["train", "-d", "digits", "--arch", "tiny", "--batch-size", 4,
            "--checkpoint-every", 10, "-w", ws]  # fmt: skip
    res = invoke(*args, "--steps", 20)
    assert res.exit_code == 0, res.output
    assert "steps 0 -> 20" in res.output
    model_dir = ws / "models" / "digits-tiny" / "checkpoints" / "step-00000020"
    assert (model_dir / "unet").is_dir()
    res = invoke(*args, "--steps", 30)  # same run, more steps: continues from 20
    assert res.exit_code == 0 and "steps 20 -> 30" in res.output, res.output
    runs = Ledger(ws / "ledger.duckdb").runs(kind="train")
    assert [r.stats["final_step"] for r in runs] == [30, 20]
    model = ws / "models" / "digits-tiny" / "checkpoints" / "step-00000030"
    res = invoke("sample", "-m", model, "-o", tmp_path / "grid.png", "--n", 4,
                 "--inference-steps", 5, "--scale", 3)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "grid.png").size == (2 * 8 * 3, 2 * 8 * 3)
    res = invoke("train", "-d", "digits", "--arch", "nope", "-w", ws)
    assert res.exit_code == 2 and "unknown reference architecture" in res.output
    res = invoke("sample", "-m", tmp_path / "missing", "-o", tmp_path / "x.png")
    assert res.exit_code == 2


@pytest.mark.usefixtures("prefect_harness")
def ingested_and_trained(tmp_path, digit_files):
    """`diffcurate ingest` 60 digits + 3 copies of digit 5, then `train` a tiny model 5 steps;
    returns the workspace and the model checkpoint."""
    write_folder(digit_files, tmp_path / "src")  # 60 digits + 3 copies of digit 5
    ws = tmp_path / "ws"
    assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
    res = invoke("train", "-d", "digits", "--arch", "tiny", "--steps", 5, "--batch-size", 8,
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    model = ws / "models" / "digits-tiny" / "checkpoints" / "step-00000005"
    return ws, model


def test_run_command_prints_gates_and_creates_a_candidate(tmp_path, digit_files):
    import json

    ws, model = ingested_and_trained(tmp_path, digit_files)
    (tmp_path / "secrets.json").write_text(json.dumps({"planted_keys": ["dup-0", "000000003"]}))
    res = invoke("run", "-d", "digits", "-m", model, "--secrets", tmp_path / "secrets.json",
                 "--generations", 8, "--max-mem", 100, "--audit-attribute", "stroke",
                 "-w", ws)  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    for expected in ("Mem%", "FD", "KID", "gate decision", "digits-candidate-1", "stroke",
                     "2 distinct images", "(configured)", "closest generation per secret",
                     "mitigate "):  # fmt: skip
        assert expected in res.output, expected
    releases = [r["tag"] for r in Ledger(ws / "ledger.duckdb").releases("digits")]
    assert releases == ["digits-candidate-1"]
    res = invoke("run", "-d", "digits", "-m", model, "--mem-tau", 0.1, "--mem-calibrate-fpr",
                 0.1, "-w", ws)  # fmt: skip
    assert res.exit_code == 2 and "either --mem-tau or --mem-calibrate-fpr" in res.output
    res = invoke("run", "-d", "digits", "-m", model, "--secrets", "no-such-key", "-w", ws)
    assert res.exit_code == 2 and "secrets not found" in res.output
    (tmp_path / "bad.json").write_text(json.dumps({"planted_keys": [1, 2]}))
    res = invoke("run", "-d", "digits", "-m", model, "--secrets", tmp_path / "bad.json", "-w", ws)
    assert res.exit_code == 2 and "expected a list" in res.output


def test_importing_the_cli_does_not_import_prefect():
    """The CLI sets PREFECT_HOME and PREFECT_LOGGING_LEVEL for the workspace before prefect
    reads them, which prefect does once, on import: no module the CLI imports at start-up may
    import prefect (one that did made every run print INFO logs)."""
    import subprocess
    import sys

    code = "import sys, diffcurate.cli; print(sorted(m for m in sys.modules if m == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_eval_command_prints_one_row_per_scorer_and_mitigation(tmp_path, digit_files):
    ws, model = ingested_and_trained(tmp_path, digit_files)
    res = invoke("eval", "-d", "digits", "-m", model, "--secrets", "dup-0,000000003",
                 "--scorers", "random,loss", "--fraction", 0.05, "--generations", 8,
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for scorer in ("original", "none", "random", "loss"):
        assert any(line.strip("│ ").startswith(scorer) for line in lines), scorer
    assert "Mem%" in res.output and "2 secrets, τ 0.08" in res.output
    (run,) = Ledger(ws / "ledger.duckdb").runs(kind="eval")
    assert run.status == "completed" and len(run.stats["rows"]) == 4
    assert Ledger(ws / "ledger.duckdb").releases("digits") == []
    res = invoke("eval", "-d", "digits", "-m", model, "--secrets", "dup-0",
                 "--scorers", "no-such-scorer", "-w", ws)  # fmt: skip
    assert res.exit_code == 2 and "signal" in res.output
