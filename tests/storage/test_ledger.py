import subprocess
import sys

import duckdb
import pytest

from diffcurate.storage.ledger import Ledger


def test_run_lifecycle_and_stats_roundtrip(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    run_id = ledger.start_run("ingest", dataset="d", source="/src", params={"batch_size": 8})
    assert ledger.run(run_id)["status"] == "running"
    ledger.finish_run(run_id, status="completed", stats={"ingested": 5, "by": {"x": 1}})
    run = ledger.run(run_id)
    assert run["status"] == "completed"
    assert run["stats"] == {"ingested": 5, "by": {"x": 1}}
    assert run["params"] == {"batch_size": 8}
    assert run["seconds"] is not None and 0 <= run["seconds"] < 60
    assert run["finished_at"] >= run["started_at"]


def test_runs_filter_and_order(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    a = ledger.start_run("ingest", dataset="a")
    b = ledger.start_run("score", dataset="a")
    c = ledger.start_run("ingest", dataset="b")
    assert [r["run_id"] for r in ledger.runs()] == [c, b, a]
    assert [r["run_id"] for r in ledger.runs(kind="ingest")] == [c, a]
    assert [r["run_id"] for r in ledger.runs(dataset="a", kind="ingest")] == [a]


def test_dead_process_runs_are_marked_interrupted(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    mine = ledger.start_run("ingest", dataset="d")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(proc.stdout)
    dead = ledger.start_run("ingest", dataset="d")
    with duckdb.connect(str(ledger.path)) as con:
        con.execute("UPDATE runs SET pid = ? WHERE run_id = ?", [dead_pid, dead])
    assert ledger.mark_interrupted() == [dead]
    assert ledger.run(dead)["status"] == "interrupted"
    assert ledger.run(mine)["status"] == "running"  # this process is alive


def test_unknown_final_status_refused(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    run_id = ledger.start_run("ingest")
    with pytest.raises(ValueError, match="unknown final status"):
        ledger.finish_run(run_id, status="done")


def test_reopening_keeps_rows(tmp_path):
    run_id = Ledger(tmp_path / "l.duckdb").start_run("ingest")
    assert Ledger(tmp_path / "l.duckdb").run(run_id)["kind"] == "ingest"


def test_resumable_run_matches_fingerprint_and_reopens(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    a = ledger.start_run("score", dataset="d", params={"fingerprint": "fp1"})
    ledger.finish_run(a, status="failed", error="boom")
    b = ledger.start_run("score", dataset="d", params={"fingerprint": "fp2"})
    ledger.finish_run(b, status="completed")
    assert ledger.resumable_run("score", "fp1") == a
    assert ledger.resumable_run("score", "fp2") is None  # completed runs are not resumed
    assert ledger.resumable_run("ingest", "fp1") is None
    ledger.reopen_run(a)
    assert ledger.run(a)["status"] == "running" and ledger.run(a)["error"] is None
    with pytest.raises(ValueError, match="not an interrupted or failed run"):
        ledger.reopen_run(b)
