"""Dashboard users (hashed tokens, roles; `diffcurate users`) and reviewer marks applied as a
new candidate release."""

from __future__ import annotations

import hashlib

import pytest
from typer.testing import CliRunner

from dashboards.synthetic import build_synthetic
from diffcurate.cli import app
from diffcurate.curation import approval
from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.users import User, UserError, UserStore

runner = CliRunner()


def test_user_store_keeps_only_token_hashes(tmp_path):
    store = UserStore(tmp_path / "ledger.duckdb")
    token = store.add("ana", "reviewer")
    assert store.authenticate(token) == User("ana", "reviewer")
    assert store.authenticate(token + "x") is None and store.authenticate("") is None
    assert [u["name"] for u in store.list()] == ["ana"]
    assert token.encode() not in (tmp_path / "ledger.duckdb").read_bytes()
    assert hashlib.sha256(token.encode()).hexdigest() != token
    with pytest.raises(UserError, match="already exists"):
        store.add("ana", "viewer")
    with pytest.raises(UserError, match="unknown role"):
        store.add("bob", "admin")
    with pytest.raises(UserError, match="invalid user name"):
        store.add("../bob", "viewer")
    assert User("a", "approver").can("reviewer") and not User("a", "viewer").can("reviewer")
    # The ledger itself still opens: the users table is an addition beside its tables.
    assert Ledger(tmp_path / "ledger.duckdb").runs() == []


def test_users_cli_prints_the_token_once(tmp_path):
    ws = tmp_path / "ws"
    r = runner.invoke(app, ["users", "add", "carol", "--role", "approver", "-w", str(ws)])
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    assert token.startswith("dct_")
    assert UserStore(ws / "ledger.duckdb").authenticate(token) == User("carol", "approver")
    listed = runner.invoke(app, ["users", "list", "-w", str(ws)])
    assert "carol" in listed.output and "approver" in listed.output and token not in listed.output
    again = runner.invoke(app, ["users", "add", "carol", "--role", "viewer", "-w", str(ws)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["users", "add", "dave", "--role", "root", "-w", str(ws)])
    assert bad.exit_code == 2 and "unknown role" in bad.output
    helped = runner.invoke(app, ["serve", "--help"])
    assert helped.exit_code == 0 and "--port" in helped.output and "--host" in helped.output


@pytest.fixture
def small(tmp_path):
    ws = tmp_path / "ws"
    info = build_synthetic(ws, "digits", n_samples=40, n_flagged=6)
    return ws, info, LanceStore(str(ws / "lancedb")), Ledger(ws / "ledger.duckdb")


def test_marks_apply_as_a_new_candidate(small):
    _ws, info, store, ledger = small
    tag = info["tag"]
    keep, undone = info["removed"][0], info["removed"][2]
    assert reviews.apply_marks(store, ledger, tag, "ann") is None  # no marks: nothing to do
    reviews.record_mark(ledger, tag, sample_id=keep, sample_ids=[keep], mark="keep",
                        actor="rev", role="reviewer", comment="a clean photo")  # fmt: skip
    reviews.record_mark(ledger, tag, sample_id=undone, sample_ids=[undone], mark="keep",
                        actor="rev", role="reviewer")  # fmt: skip
    reviews.record_mark(ledger, tag, sample_id=undone, sample_ids=[undone], mark="remove",
                        actor="rev", role="reviewer")  # changed their mind  # fmt: skip
    reviews.record_mark(ledger, tag, sample_id=info["removed"][1],
                        sample_ids=[info["removed"][1]], mark="remove", actor="rev",
                        role="reviewer")  # already removed: changes nothing  # fmt: skip
    with pytest.raises(reviews.ReviewError, match="not flagged"):
        reviews.record_mark(ledger, tag, sample_id=info["kept"][0],
                            sample_ids=[info["kept"][0]], mark="remove", actor="rev",
                            role="reviewer")  # fmt: skip
    new = reviews.apply_marks(store, ledger, tag, "ann")
    assert new is not None and new.tag == "digits-candidate-2" and new.status == "pending"
    ids = rel.manifest_ids(ledger, new.tag)
    assert keep in ids["kept"] and undone in ids["removed"]
    assert len(ids["kept"]) == len(info["kept"]) + 1 and len(ids["removed"]) == 5
    manifest = ledger.release(new.tag)["manifest"]
    # The original's gate results are kept for reference, not as this candidate's.
    assert manifest["based_on"] == tag and manifest["gates_measured"] is False
    assert "gate_passed" not in manifest and manifest["based_on_gates"]["gate_passed"] is False
    assert manifest["runs"] == ledger.release(tag)["manifest"]["runs"]
    assert [o["sample_id"] for o in manifest["overrides"]] == [keep]
    assert reviews.superseded_by(ledger, tag) == new.tag
    rel.verify(store, ledger, new.tag)  # the Lance version holds exactly the kept ids
    with pytest.raises(reviews.ReviewError, match="superseded"):
        reviews.apply_marks(store, ledger, tag, "ann")
    # Its gates are not measured: the approval service asks for an override.
    with pytest.raises(approval.ApprovalRefused, match="gates not measured"):
        approval.approve(store, ledger, new.tag, "ann", "ok")


def test_later_marks_win_and_marks_cover_duplicate_groups(small):
    _, info, _, ledger = small
    tag, a, b = info["tag"], info["removed"][0], info["removed"][1]
    group = sorted([a, b])
    reviews.record_mark(ledger, tag, sample_id=a, sample_ids=group, mark="keep", actor="r",
                        role="reviewer")  # fmt: skip
    reviews.record_mark(ledger, tag, sample_id=b, sample_ids=[b], mark="remove", actor="r",
                        role="reviewer")  # fmt: skip
    kept, removed, changed = reviews.marked_sets(info["kept"], info["removed"],
                                                 reviews.marks(ledger, tag))  # fmt: skip
    assert a in kept and b in removed and len(changed) == 1
    with pytest.raises(reviews.ReviewError):
        reviews.record_mark(ledger, tag, sample_id=a, sample_ids=[a], mark="maybe", actor="r",
                            role="reviewer")  # fmt: skip
    with pytest.raises(reviews.ReviewError):
        reviews.record_mark(ledger, tag, sample_id=a, sample_ids=[b], mark="keep", actor="r",
                            role="reviewer")  # fmt: skip


def test_serve_starts_uvicorn_on_the_given_address(tmp_path, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    r = runner.invoke(app, ["serve", "--port", "9911", "-w", str(tmp_path / "ws")])
    assert r.exit_code == 0, r.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9911)
    assert "no users yet" in r.output and "http://127.0.0.1:9911/" in r.output
    assert {route.path for route in seen["app"].routes} >= {"/runs", "/releases/{tag}/approve"}
