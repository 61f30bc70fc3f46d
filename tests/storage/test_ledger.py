import subprocess
import sys
from datetime import datetime

import duckdb
import pytest
from pydantic import ValidationError

from diffcurate.storage import reviews
from diffcurate.storage.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerTamperError,
    LedgerVersionError,
    RunRecord,
)
from diffcurate.storage.users import User, UserStore, hash_token


def test_run_lifecycle_and_stats_roundtrip(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    run_id = ledger.start_run("ingest", dataset="d", source="/src", params={"batch_size": 8})
    assert ledger.run(run_id).status == "running"
    ledger.finish_run(run_id, status="completed", stats={"ingested": 5, "by": {"x": 1}})
    run = ledger.run(run_id)
    assert run.status == "completed"
    assert run.stats == {"ingested": 5, "by": {"x": 1}}
    assert run.params == {"batch_size": 8}
    assert run.seconds is not None and 0 <= run.seconds < 60
    assert run.finished_at >= run.started_at


def test_run_records_are_typed_validated_and_frozen(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    running = ledger.start_run("score", params={"scorer": {"signal": "loss"}})
    done = ledger.start_run("ingest", dataset="d", source="/src")
    ledger.finish_run(done, status="failed", stats={"n": [1, 2]}, error="boom")
    run = ledger.run(running)
    assert isinstance(run, RunRecord) and ledger.runs() == [ledger.run(done), run]
    assert (run.kind, run.dataset, run.source, run.status) == ("score", None, None, "running")
    assert isinstance(run.started_at, datetime) and run.started_at.tzinfo is not None
    assert run.finished_at is None and run.seconds is None and run.error is None
    assert run.params == {"scorer": {"signal": "loss"}} and run.stats == {}  # decoded JSON
    assert isinstance(run.pid, int) and run.host
    failed = ledger.run(done)
    assert failed.status == "failed" and failed.stats == {"n": [1, 2]} and failed.params == {}
    assert isinstance(failed.finished_at, datetime) and isinstance(failed.seconds, float)
    with pytest.raises(ValidationError, match="frozen"):
        run.status = "completed"  # type: ignore[misc]
    row = run.model_dump()
    with pytest.raises(ValidationError, match="status"):
        RunRecord.model_validate({**row, "status": "done"})
    with pytest.raises(ValidationError, match="started_at"):
        RunRecord.model_validate({**row, "started_at": None})
    with duckdb.connect(str(ledger.path)) as con:  # a status the ledger never writes
        con.execute("UPDATE runs SET status = 'paused' WHERE run_id = ?", [running])
    with pytest.raises(ValidationError, match="status"):
        ledger.run(running)


def test_runs_filter_and_order(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    a = ledger.start_run("ingest", dataset="a")
    b = ledger.start_run("score", dataset="a")
    c = ledger.start_run("ingest", dataset="b")
    assert [r.run_id for r in ledger.runs()] == [c, b, a]
    assert [r.run_id for r in ledger.runs(kind="ingest")] == [c, a]
    assert [r.run_id for r in ledger.runs(dataset="a", kind="ingest")] == [a]


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
    assert ledger.run(dead).status == "interrupted"
    assert ledger.run(mine).status == "running"  # this process is alive


def test_unknown_final_status_refused(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    run_id = ledger.start_run("ingest")
    with pytest.raises(ValueError, match="unknown final status"):
        ledger.finish_run(run_id, status="done")


def test_reopening_keeps_rows(tmp_path):
    run_id = Ledger(tmp_path / "l.duckdb").start_run("ingest")
    assert Ledger(tmp_path / "l.duckdb").run(run_id).kind == "ingest"


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
    assert ledger.run(a).status == "running" and ledger.run(a).error is None
    with pytest.raises(ValueError, match="not an interrupted or failed run"):
        ledger.reopen_run(b)


def test_recording_completes_a_run_with_its_stats(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with ledger.recording("ingest", dataset="d", source="/s", params={"a": 1}) as run:
        assert ledger.run(run.run_id).status == "running"
        done = {"n": 0}
        run.stats = lambda: dict(done)
        done["n"] = 3
    row = ledger.run(run.run_id)
    assert (row.status, row.stats, row.params, row.error) == (
        "completed",
        {"n": 3},
        {"a": 1},
        None,
    )
    assert not run.resumed


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt()])
def test_recording_fails_a_run_on_any_exception_and_reraises(tmp_path, error):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with pytest.raises(type(error)), ledger.recording("score") as run:
        run.stats = lambda: {"scored": 2}
        raise error
    row = ledger.run(run.run_id)
    assert (row.status, row.stats) == ("failed", {"scored": 2})
    assert row.error == repr(error)


def test_recording_resumes_the_failed_run_with_the_same_fingerprint(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with (
        pytest.raises(RuntimeError),
        ledger.recording("score", params={"fingerprint": "fp"}, resume="fp") as first,
    ):
        raise RuntimeError("killed")
    with ledger.recording("score", params={"fingerprint": "fp"}, resume="fp") as again:
        assert again.resumed and again.run_id == first.run_id
    with ledger.recording("score", params={"fingerprint": "fp"}, resume="fp") as fresh:
        assert not fresh.resumed and fresh.run_id != first.run_id  # completed: not resumed
    assert [r.status for r in ledger.runs()] == ["completed", "completed"]


# Decision tables ---------------------------------------------------------------------------


def test_version_1_ledger_is_upgraded_in_place_and_keeps_its_runs(tmp_path):
    path = tmp_path / "ledger.duckdb"
    with duckdb.connect(str(path)) as con:  # a ledger as schema version 1 wrote it
        con.execute("CREATE TABLE ledger_meta (name VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO ledger_meta VALUES ('schema_version', '1')")
        con.execute(
            "CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, dataset "
            "VARCHAR, source VARCHAR, status VARCHAR NOT NULL, started_at TIMESTAMPTZ NOT NULL, "
            "finished_at TIMESTAMPTZ, seconds DOUBLE, params JSON, stats JSON, error VARCHAR, "
            "host VARCHAR NOT NULL, pid INTEGER NOT NULL)"
        )
        con.execute(
            "INSERT INTO runs VALUES ('old-run', 'ingest', 'd', NULL, 'completed', now(), NULL, "
            "NULL, '{}', '{}', NULL, 'h', 1)"
        )
    ledger = Ledger(path)
    assert ledger.schema_version == SCHEMA_VERSION == 4
    assert ledger.run("old-run").kind == "ingest"
    ledger.record_decision("d-candidate-1", action="reject", actor="a", role="approver")
    assert len(ledger.decisions()) == 1


def test_version_2_ledger_with_self_made_users_and_marks_tables_is_upgraded(tmp_path):
    """Before version 3, storage.users and storage.reviews created their own tables."""
    path = tmp_path / "ledger.duckdb"
    Ledger(path)
    with duckdb.connect(str(path)) as con:  # back to version 2, then the old modules' DDL
        con.execute("UPDATE ledger_meta SET value = '2' WHERE name = 'schema_version'")
        con.execute("DROP TABLE users")
        con.execute("DROP TABLE review_marks")
        con.execute(
            "CREATE TABLE IF NOT EXISTS users (name VARCHAR PRIMARY KEY, role VARCHAR NOT NULL, "
            "token_hash VARCHAR NOT NULL UNIQUE, created_at TIMESTAMPTZ NOT NULL, "
            "created_by VARCHAR NOT NULL)"
        )
        con.execute(
            "CREATE TABLE IF NOT EXISTS review_marks (mark_id VARCHAR PRIMARY KEY, tag VARCHAR "
            "NOT NULL, sample_id VARCHAR NOT NULL, sample_ids JSON NOT NULL, mark VARCHAR NOT "
            "NULL, actor VARCHAR NOT NULL, role VARCHAR NOT NULL, comment VARCHAR NOT NULL, "
            "created_at TIMESTAMPTZ NOT NULL)"
        )
        con.execute(
            "INSERT INTO users VALUES ('ann', 'approver', ?, now(), 'cli')", [hash_token("t0k")]
        )
        con.execute(
            "INSERT INTO review_marks VALUES ('m1', 'd-candidate-1', 's1', '[\"s1\"]', 'keep', "
            "'rev', 'reviewer', '', now())"
        )
    ledger = Ledger(path)
    assert ledger.schema_version == 4
    assert UserStore(path).authenticate("t0k") == User(name="ann", role="approver")
    assert [(m["mark_id"], m["sample_ids"]) for m in reviews.marks(ledger)] == [("m1", ["s1"])]
    UserStore(path).add("bob", "viewer")  # the tables keep working
    assert [u["name"] for u in UserStore(path).list()] == ["ann", "bob"]


def test_a_fresh_ledger_has_every_table_so_no_module_creates_its_own(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    with ledger.connect(read_only=True) as con:
        tables = {
            r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
    assert {"runs", "audits", "gate_checks", "releases", "decisions", "users",
            "review_marks"} <= tables  # fmt: skip
    assert reviews.marks(ledger) == [] and UserStore(ledger.path).list() == []


def test_newer_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.duckdb"
    Ledger(path)
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE ledger_meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(LedgerVersionError, match="schema version 99"):
        Ledger(path)


def test_audits_roundtrip_per_run(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    groups = {"f": {"n": 40, "removed": 2, "rate": 0.05}, "m": {"n": 60, "removed": 1}}
    a1 = ledger.record_audit("run-1", dataset="d", attribute="gender", groups=groups,
                             passed=False, summary={"four_fifths": 0.33})  # fmt: skip
    ledger.record_audit("run-1", dataset="d", attribute="age", groups={}, passed=True)
    ledger.record_audit("run-2", dataset="d", attribute="gender", groups={}, passed=True)
    rows = ledger.audits("run-1")
    assert [r["attribute"] for r in rows] == ["gender", "age"]
    assert rows[0]["audit_id"] == a1
    assert rows[0]["groups"] == groups and rows[0]["summary"] == {"four_fifths": 0.33}
    assert rows[0]["passed"] is False and rows[1]["passed"] is True
    assert rows[1]["summary"] == {}
    assert len(ledger.audits()) == 3


def test_gate_checks_roundtrip_with_policy_and_inputs(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    ledger.record_gate_check("gate-1", name="mem_pct", value_before=12.5, value_after=1.0,
                             threshold=2.0, passed=True, policy_version="v3",
                             inputs={"tau": 0.95, "canaries": ["a", "b"]})  # fmt: skip
    ledger.record_gate_check("gate-1", name="fd", value_before=10.0, value_after=13.0,
                             threshold=0.2, passed=False, policy_version="v3")  # fmt: skip
    ledger.record_gate_check("gate-2", name="fd", passed=True, policy_version="v4")
    rows = ledger.gate_checks("gate-1")
    assert [(r["name"], r["passed"]) for r in rows] == [("mem_pct", True), ("fd", False)]
    assert rows[0]["value_before"] == 12.5 and rows[0]["value_after"] == 1.0
    assert rows[0]["threshold"] == 2.0 and rows[0]["policy_version"] == "v3"
    assert rows[0]["inputs"] == {"tau": 0.95, "canaries": ["a", "b"]}
    assert ledger.gate_checks("gate-2")[0]["value_before"] is None
    # Queryable with plain DuckDB SQL.
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        failed = con.execute(
            "SELECT name, value_after / value_before - 1 FROM gate_checks WHERE NOT passed"
        ).fetchall()
    assert failed == [("fd", pytest.approx(0.3))]


def _release(ledger, tag="d-candidate-1", n=1, kind="candidate"):
    ledger.record_release(tag=tag, dataset="d", n=n, kind=kind, lance_table="release_d",
                          lance_version=3, n_kept=2, n_removed=1,
                          manifest={"kept_ids": ["a", "b"], "removed_ids": ["c"]},
                          created_by="me")  # fmt: skip


def test_releases_are_recorded_once_per_tag_and_per_n(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    _release(ledger)
    _release(ledger, tag="d-release-1", kind="release")
    with pytest.raises(ValueError, match="already recorded"):
        _release(ledger)  # same tag
    with pytest.raises(ValueError, match="already recorded"):
        _release(ledger, tag="other-name", n=1)  # same (dataset, kind, n)
    with pytest.raises(ValueError, match="unknown release kind"):
        _release(ledger, tag="d-x-2", n=2, kind="draft")
    rel = ledger.release("d-candidate-1")
    assert rel["manifest"] == {"kept_ids": ["a", "b"], "removed_ids": ["c"]}
    assert (rel["n"], rel["lance_version"], rel["n_kept"], rel["created_by"]) == (1, 3, 2, "me")
    assert [r["tag"] for r in ledger.releases("d")] == ["d-candidate-1", "d-release-1"]
    assert "manifest" not in ledger.releases()[0]
    assert ledger.releases("d", with_manifest=True)[0]["manifest"]["removed_ids"] == ["c"]
    assert ledger.releases("other") == []
    with pytest.raises(KeyError, match="no release"):
        ledger.release("nope")


def test_decisions_are_append_only_and_attributed(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    ledger.record_decision("t1", action="override", actor="ann", role="approver", comment="ok")
    ledger.record_decision("t1", action="approve", actor="ann", role="approver")
    ledger.record_decision("t2", action="reject", actor="bob", role="approver", comment="no")
    rows = ledger.decisions("t1")
    assert [(r["action"], r["actor"], r["role"]) for r in rows] == [
        ("override", "ann", "approver"),
        ("approve", "ann", "approver"),
    ]
    assert rows[0]["comment"] == "ok" and rows[1]["comment"] == ""
    assert rows[0]["created_at"] <= rows[1]["created_at"]
    assert len(ledger.decisions()) == 3
    with pytest.raises(ValueError, match="unknown decision"):
        ledger.record_decision("t1", action="delete", actor="ann", role="approver")
    with pytest.raises(ValueError, match="needs an actor"):
        ledger.record_decision("t1", action="approve", actor=" ", role="approver")
    # The API has no way to change or remove a decision.
    assert not [m for m in dir(ledger) if m.startswith(("update", "delete", "remove"))]
    assert len(ledger.decisions()) == 3


# Decision hash chain -----------------------------------------------------------------------


def _three_decisions(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    ledger.record_decision("t1", action="override", actor="ann", role="approver", comment="ok")
    ledger.record_decision("t1", action="approve", actor="ann", role="approver", comment="go")
    ledger.record_decision("t2", action="reject", actor="bob", role="approver", comment="no")
    assert ledger.decision_chain_problems() == []
    ledger.check_decision_chain()
    return ledger


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("DELETE FROM decisions WHERE action = 'reject'", "deleted"),  # the last row
        ("DELETE FROM decisions WHERE action = 'override'", "deleted"),  # a middle row
        ("UPDATE decisions SET comment = 'fine' WHERE action = 'reject'", "edited"),
        ("UPDATE decisions SET action = 'approve' WHERE action = 'reject'", "edited"),
        (
            "INSERT INTO decisions (decision_id, tag, action, actor, role, comment, created_at) "
            "VALUES ('d-x', 't2', 'approve', 'eve', 'approver', '', now())",
            "inserted",
        ),
    ],
)
def test_a_decision_row_deleted_edited_or_inserted_by_hand_breaks_the_chain(
    tmp_path, tamper, problem
):
    ledger = _three_decisions(tmp_path)
    with duckdb.connect(str(ledger.path)) as con:
        con.execute(tamper)
    assert any(problem in p for p in ledger.decision_chain_problems())
    with pytest.raises(LedgerTamperError, match="altered outside diffcurate"):
        ledger.check_decision_chain()
    # Reopening does not re-chain (and so launder) the altered rows.
    assert Ledger(ledger.path).decision_chain_problems()


def test_approval_transaction_extends_the_chain(tmp_path):
    ledger = _three_decisions(tmp_path)
    release = {"tag": "d-release-1", "dataset": "d", "n": 1, "lance_table": "release_d",
               "lance_version": 2, "n_kept": 1, "n_removed": 0, "manifest": {},
               "created_by": "ann"}  # fmt: skip
    ledger.record_approval("d-candidate-1", actor="ann", role="approver", comment="c",
                           override=True, release=release)  # fmt: skip
    assert len(ledger.decisions()) == 5 and ledger.decision_chain_problems() == []
    assert "row_hash" not in ledger.decisions()[0]


def test_version_3_decisions_are_chained_on_upgrade(tmp_path):
    path = tmp_path / "ledger.duckdb"
    Ledger(path)
    with duckdb.connect(str(path)) as con:  # a version 3 decisions table with two rows
        con.execute("UPDATE ledger_meta SET value = '3' WHERE name = 'schema_version'")
        con.execute("DELETE FROM ledger_meta WHERE name = 'decisions_head'")
        con.execute("DROP TABLE decisions")
        con.execute(
            "CREATE TABLE decisions (decision_id VARCHAR PRIMARY KEY, tag VARCHAR NOT NULL, "
            "action VARCHAR NOT NULL, actor VARCHAR NOT NULL, role VARCHAR NOT NULL, comment "
            "VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL)"
        )
        con.execute(
            "INSERT INTO decisions VALUES "
            "('d1', 't1', 'reject', 'a', 'approver', 'x', now() - INTERVAL 2 SECOND), "
            "('d2', 't2', 'approve', 'a', 'approver', 'y', now() - INTERVAL 1 SECOND)"
        )
    ledger = Ledger(path)
    assert ledger.schema_version == 4
    assert ledger.decision_chain_problems() == []
    ledger.record_decision("t3", action="reject", actor="a", role="approver", comment="z")
    assert [d["decision_id"] for d in ledger.decisions()][:2] == ["d1", "d2"]
    assert ledger.decision_chain_problems() == []
