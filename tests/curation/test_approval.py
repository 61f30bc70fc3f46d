"""The approval service through both front ends: every scenario is played once through
``diffcurate release approve|reject`` and once through the dashboard's forms, each in a fresh
workspace, and must end in the same outcome and the same ledger rows and Lance tags. Then two
simultaneous approvals (threads, and processes), and a crash between the Lance tag and the
ledger transaction."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dashboards.conftest import login
from diffcurate.cli import app
from diffcurate.curation import approval
from diffcurate.dashboards.app import create_app
from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.users import UserStore
from storage.test_releases import sample_rows

C1, C2, C3 = "digits-candidate-1", "digits-candidate-2", "digits-candidate-3"
runner = CliRunner()


@dataclass
class Ws:
    path: Path
    store: LanceStore
    ledger: Ledger
    tokens: dict[str, str] = field(default_factory=dict)


def make_ws(root: Path, digit_files, users: bool = True) -> Ws:
    """12 digits, two pending candidates (both passed their gates), an approver ``ann``, a
    reviewer ``rita`` and an approver ``temp`` whom scenarios may delete after logging in."""
    root.mkdir(parents=True)
    store, ledger = LanceStore(str(root / "lancedb")), Ledger(root / "ledger.duckdb")
    store.insert_new("samples", sample_rows(digit_files[:12], "digits"))
    ids = sorted(store.read("samples", columns=["sample_id"])["sample_id"].to_pylist())
    rel.create_candidate(store, ledger, "digits", ids[2:], ids[:2], {"gate_passed": True})
    rel.create_candidate(store, ledger, "digits", ids[3:], ids[:3], {"gate_passed": True})
    ws = Ws(root, store, ledger)
    if users:
        user_store = UserStore(ledger.path)
        ws.tokens = {n: user_store.add(n, r) for n, r in
                     (("ann", "approver"), ("rita", "reviewer"), ("temp", "approver"))}  # fmt: skip
    return ws


def snapshot(ws: Ws) -> dict:
    """What a decision leaves behind: decisions, release rows, Lance tags."""
    decisions = [
        (d["tag"], d["action"], d["actor"], d["role"], d["comment"]) for d in ws.ledger.decisions()
    ]
    releases = [
        (r["tag"], r["kind"], r["n_kept"], r["n_removed"],
         ws.ledger.release(r["tag"])["manifest"].get("based_on"))
        for r in ws.ledger.releases()
    ]  # fmt: skip
    tags = sorted(ws.store.db.open_table("release_digits").tags.list())
    return {"decisions": decisions, "releases": releases, "tags": tags}


# Front ends: decide(ws, action, tag, actor, comment) -> (ok, detail, text)
def cli_decide(ws: Ws, action: str, tag: str, actor: str, comment: str):
    res = runner.invoke(app, ["release", action, tag, "--actor", actor, "-c", comment,
                              "-w", str(ws.path)])  # fmt: skip
    assert res.exit_code in (0, 2), res.output
    return res.exit_code == 0, res.exit_code, res.output


class Dashboard:
    """One logged-in TestClient per user with a token (logged in before the scenario's setup,
    so a scenario can delete a user who holds a session)."""

    def __init__(self, ws: Ws) -> None:
        self.app = create_app(ws.path)
        self.clients = {}
        for name, token in ws.tokens.items():
            client = TestClient(self.app, base_url="http://testserver")
            self.clients[name] = (client, login(client, token))

    def decide(self, ws: Ws, action: str, tag: str, actor: str, comment: str):
        client, csrf = self.clients[actor]
        r = client.post(f"/releases/{tag}/{action}", data={"comment": comment, "csrf_token": csrf},
                        follow_redirects=False)  # fmt: skip
        return r.status_code == 303, r.status_code, r.text.replace("&#39;", "'")


def mark_one_flagged_sample_kept(ws: Ws) -> None:
    flagged = rel.manifest_ids(ws.ledger, C1)["removed"][0]
    reviews.record_mark(ws.ledger, C1, sample_id=flagged, sample_ids=[flagged], mark="keep",
                        actor="rita", role="reviewer", comment="a clean photo")  # fmt: skip


def supersede(ws: Ws) -> None:
    mark_one_flagged_sample_kept(ws)
    reviews.apply_marks(ws.store, ws.ledger, C1, "ann")


def reject_then_delete_row(ws: Ws) -> None:
    approval.reject(ws.store, ws.ledger, C1, "ann", "memorizes secrets")
    with duckdb.connect(str(ws.ledger.path)) as con:
        con.execute("DELETE FROM decisions WHERE action = 'reject'")


def delete_temp(ws: Ws) -> None:
    with duckdb.connect(str(ws.ledger.path)) as con:
        con.execute("DELETE FROM users WHERE name = 'temp'")


@dataclass(frozen=True)
class Scenario:
    name: str
    action: str
    tag: str
    actor: str
    comment: str
    ok: bool
    http: int  # the dashboard's status: 303 done, else the refusal's
    says: str  # in the CLI's message and the dashboard's page
    setup: Callable[[Ws], None] = lambda ws: None
    decisions: tuple = ()  # expected decisions after the front end's call
    releases: tuple = ()  # expected release rows beyond the two candidates


APPROVED_C1 = ((C1, "approve", "ann", "approver", "first"),)
RELEASE_1 = (("digits-release-1", "release", 10, 2, None),)
CANDIDATE_3 = ((C3, "candidate", 11, 1, C1),)
SCENARIOS = [
    Scenario("approve", "approve", C1, "ann", "gates passed", True, 303, "",
             decisions=((C1, "approve", "ann", "approver", "gates passed"),),
             releases=RELEASE_1),
    Scenario("reject", "reject", C1, "ann", "audit skew", True, 303, "",
             decisions=((C1, "reject", "ann", "approver", "audit skew"),)),
    Scenario("pending reviewer marks leave the gates unmeasured: override needed", "approve",
             C1, "ann", "with marks", False, 409, "gates not measured",
             setup=mark_one_flagged_sample_kept),
    Scenario("a marked candidate carries no gate results", "approve", C3, "ann", "ok", False,
             409, "gates not measured", setup=supersede, releases=CANDIDATE_3),
    Scenario("a deleted reject row is detected and nothing is decided", "approve", C1, "ann",
             "ok", False, 409, "altered outside diffcurate", setup=reject_then_delete_row),
    Scenario("superseded candidate", "approve", C1, "ann", "ok", False, 409, "superseded by",
             setup=supersede, releases=CANDIDATE_3),
    Scenario("reject a superseded candidate", "reject", C1, "ann", "no", False, 409,
             "superseded by", setup=supersede, releases=CANDIDATE_3),
    Scenario("already approved", "approve", C1, "ann", "again", False, 409, "already approved",
             setup=lambda ws: approval.approve(ws.store, ws.ledger, C1, "ann", "first"),
             decisions=APPROVED_C1, releases=RELEASE_1),
    Scenario("reject an approved candidate", "reject", C1, "ann", "late", False, 409,
             "already approved",
             setup=lambda ws: approval.approve(ws.store, ws.ledger, C1, "ann", "first"),
             decisions=APPROVED_C1, releases=RELEASE_1),
    Scenario("rejected", "approve", C1, "ann", "ok", False, 409, "already rejected",
             setup=lambda ws: approval.reject(ws.store, ws.ledger, C1, "ann", "no"),
             decisions=((C1, "reject", "ann", "approver", "no"),)),
    Scenario("a release is not a candidate", "approve", "digits-release-1", "ann", "ok", False,
             409, "is a release",
             setup=lambda ws: approval.approve(ws.store, ws.ledger, C1, "ann", "first"),
             decisions=APPROVED_C1, releases=RELEASE_1),
    Scenario("unknown tag", "approve", "digits-candidate-9", "ann", "ok", False, 404,
             "no candidate or release tagged"),
    Scenario("missing comment (approve)", "approve", C1, "ann", "  ", False, 400,
             "needs a comment"),
    Scenario("missing comment (reject)", "reject", C1, "ann", "", False, 400, "needs a comment"),
    # A removed user: the CLI names them "unknown actor" (see the test below); the dashboard
    # ends their session (401) before any rule is checked.
    Scenario("unknown actor", "approve", C1, "temp", "ok", False, 401, "", setup=delete_temp),
    Scenario("a reviewer may not decide", "reject", C1, "rita", "no", False, 403, ""),
]  # fmt: skip


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_both_front_ends_apply_the_same_rules(scenario, tmp_path, digit_files):
    seen = {}
    for front in ("cli", "dashboard"):
        ws = make_ws(tmp_path / front, digit_files)
        decide = cli_decide if front == "cli" else Dashboard(ws).decide
        scenario.setup(ws)
        ok, detail, text = decide(ws, scenario.action, scenario.tag, scenario.actor,
                                  scenario.comment)  # fmt: skip
        assert ok is scenario.ok, (front, detail, text[-500:])
        if front == "dashboard":
            assert detail == scenario.http, text[-500:]
        else:
            assert detail == (0 if scenario.ok else 2)
        assert scenario.says in text, (front, text[-500:])
        seen[front] = snapshot(ws)
        assert seen[front]["decisions"] == list(scenario.decisions), front
        two_candidates = [(C1, "candidate", 10, 2, None), (C2, "candidate", 9, 3, None)]
        assert seen[front]["releases"] == two_candidates + list(scenario.releases), front
    assert seen["cli"] == seen["dashboard"]


def test_the_cli_in_a_workspace_without_users_records_the_named_actor(tmp_path, digit_files):
    ws = make_ws(tmp_path / "ws", digit_files, users=False)
    ok, _, text = cli_decide(ws, "approve", C1, "whoever", "single-user workspace")
    assert ok, text
    assert snapshot(ws)["decisions"] == [
        (C1, "approve", "whoever", "approver", "single-user workspace")
    ]


def test_the_cli_names_a_user_who_is_not_registered(tmp_path, digit_files):
    ws = make_ws(tmp_path / "ws", digit_files)
    ok, _, text = cli_decide(ws, "approve", C1, "mallory", "ok")
    assert not ok and "unknown actor 'mallory'" in text and "users add mallory" in text
    ok, _, text = cli_decide(ws, "approve", C1, "rita", "ok")
    assert not ok and "'rita' is a reviewer" in text
    assert snapshot(ws)["decisions"] == []


def test_two_simultaneous_approvals_in_threads_release_once(tmp_path, digit_files, monkeypatch):
    ws = make_ws(tmp_path / "ws", digit_files)
    slow_apply = reviews.apply_marks

    def slow(*args, **kwargs):  # hold the lock long enough for the other thread to queue
        threading.Event().wait(0.3)
        return slow_apply(*args, **kwargs)

    monkeypatch.setattr(reviews, "apply_marks", slow)
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def run(actor: str) -> None:
        start.wait()
        try:
            results[actor] = approval.approve(ws.store, ws.ledger, C1, actor, f"by {actor}")
        except approval.ApprovalRefused as e:
            results[actor] = e

    threads = [threading.Thread(target=run, args=(a,)) for a in ("ann", "temp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [r for r in results.values() if isinstance(r, approval.Approval)]
    lost = [r for r in results.values() if isinstance(r, approval.ApprovalRefused)]
    assert len(won) == 1 and len(lost) == 1, results
    assert lost[0].reason == "conflict" and "already approved" in str(lost[0])
    snap = snapshot(ws)
    assert [d[1] for d in snap["decisions"]] == ["approve"]
    assert [r[0] for r in snap["releases"] if r[1] == "release"] == ["digits-release-1"]
    rel.verify(ws.store, ws.ledger, "digits-release-1")


def test_two_simultaneous_approvals_in_processes_release_once(tmp_path, digit_files):
    ws = make_ws(tmp_path / "ws", digit_files, users=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFCURATE_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffcurate.cli", "release", "approve", C1, "-w", str(ws.path)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    procs = [
        subprocess.Popen([*cmd, "--actor", actor, "-c", f"by {actor}"], **pipes)
        for actor in ("ann", "bob")
    ]
    done = [(p.wait(120), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in done) == [0, 2], done
    loser = next(err for code, _, err in done if code == 2)
    assert "already approved" in loser and "Traceback" not in loser
    snap = snapshot(ws)
    assert [d[1] for d in snap["decisions"]] == ["approve"]
    assert [r[0] for r in snap["releases"] if r[1] == "release"] == ["digits-release-1"]


def test_a_crash_between_the_tag_and_the_ledger_is_reported_then_completed(
    tmp_path, digit_files, monkeypatch
):
    ws = make_ws(tmp_path / "ws", digit_files, users=False)

    def crash(self, *args, **kwargs):
        raise RuntimeError("killed before the ledger transaction")

    with monkeypatch.context() as m:
        m.setattr(Ledger, "record_approval", crash)
        with pytest.raises(RuntimeError, match="killed"):
            approval.approve(ws.store, ws.ledger, C1, "ann", "first try")
    snap = snapshot(ws)
    assert "digits-release-1" in snap["tags"] and snap["decisions"] == []
    assert rel.interrupted_approval(ws.store, ws.ledger, C1) == "digits-release-1"
    res = runner.invoke(app, ["release", "show", C1, "-w", str(ws.path)])
    assert res.exit_code == 1 and "interrupted approval" in res.output
    ok, _, text = cli_decide(ws, "reject", C1, "ann", "changed my mind")
    assert not ok and "interrupted approval" in text
    ok, _, text = cli_decide(ws, "approve", C1, "ann", "second try")
    assert ok and "completed the interrupted approval" in text, text
    assert snapshot(ws)["decisions"] == [(C1, "approve", "ann", "approver", "second try")]
    rel.verify(ws.store, ws.ledger, "digits-release-1")
    res = runner.invoke(app, ["release", "show", C1, "-w", str(ws.path)])
    assert res.exit_code == 0, res.output


def test_marks_are_applied_only_with_an_override_reason(tmp_path, digit_files):
    ws = make_ws(tmp_path / "ws", digit_files)
    mark_one_flagged_sample_kept(ws)
    assert approval.failed_checks({"gate_passed": True}, marks_pending=True) == [
        approval.NOT_MEASURED
    ]
    done = approval.approve(ws.store, ws.ledger, C1, "ann", "one clean photo put back",
                            override_reason="re-gate next run")  # fmt: skip
    assert (done.approved, done.marks_applied, done.release.tag) == (C3, 1, "digits-release-3")
    manifest = ws.ledger.release(C3)["manifest"]
    assert manifest["gates_measured"] is False
    assert "gate_passed" not in manifest and "gates" not in manifest
    assert manifest["based_on_gates"] == {"gate_passed": True}
    assert [(d["tag"], d["action"]) for d in ws.ledger.decisions()] == [
        (C3, "override"),
        (C3, "approve"),
    ]
    assert "override reason: re-gate next run" in ws.ledger.decisions()[1]["comment"]


def test_a_sample_the_run_kept_cannot_be_marked(tmp_path, digit_files):
    ws = make_ws(tmp_path / "ws", digit_files)
    ids = rel.manifest_ids(ws.ledger, C1)
    kept, flagged = ids["kept"][0], ids["removed"][0]
    with pytest.raises(reviews.ReviewError, match="not flagged"):
        reviews.record_mark(ws.ledger, C1, sample_id=kept, sample_ids=[kept], mark="remove",
                            actor="rita", role="reviewer")  # fmt: skip
    with pytest.raises(reviews.ReviewError, match="not flagged"):  # nor smuggled into a group
        reviews.record_mark(ws.ledger, C1, sample_id=flagged, sample_ids=[flagged, kept],
                            mark="keep", actor="rita", role="reviewer")  # fmt: skip
    assert reviews.marks(ws.ledger, C1) == []
