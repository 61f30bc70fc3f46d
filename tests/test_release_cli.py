"""`diffcurate release list|show|approve|reject`: exit codes, messages, ledger and Lance tags."""

import json

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.config import load_settings
from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from storage.test_releases import sample_rows

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def ws(workspace, digit_files):
    """A workspace with 12 digit samples and two candidates (the second failed its gates)."""
    settings = load_settings(workspace)
    store = LanceStore(settings.layout.lancedb_uri)
    store.insert_new("samples", sample_rows(digit_files[:12], "digits"))
    ledger = Ledger(settings.layout.ledger_path)
    ids = sorted(store.read("samples", columns=["sample_id"])["sample_id"].to_pylist())
    rel.create_candidate(store, ledger, "digits", ids[2:], ids[:2],
                         {"runs": {"score": "score-1"}, "gate_passed": True})  # fmt: skip
    rel.create_candidate(store, ledger, "digits", ids[3:], ids[:3], {"gate_passed": False})
    return workspace, store, ledger


def tags(store):
    """Candidate and release tags (not the base tag candidates are cut from)."""
    return {t for t in store.db.open_table("release_digits").tags.list() if "-base-" not in t}


def test_release_is_a_command_group_in_help():
    res = invoke("--help")
    assert res.exit_code == 0 and "release" in res.output
    res = invoke("release", "--help")
    for cmd in ("list", "show", "approve", "reject"):
        assert cmd in res.output


def test_list_and_show(ws):
    workspace, _, _ = ws
    res = invoke("release", "list", "-w", workspace)
    assert res.exit_code == 0, res.output
    assert "digits-candidate-1" in res.output and "digits-candidate-2" in res.output
    assert res.output.count("pending") == 2
    res = invoke("release", "list", "-w", workspace, "--json")
    rows = json.loads(res.output)
    assert [(r["tag"], r["n_kept"], r["n_removed"]) for r in rows] == [
        ("digits-candidate-1", 10, 2),
        ("digits-candidate-2", 9, 3),
    ]
    res = invoke("release", "show", "digits-candidate-1", "-w", workspace)
    assert res.exit_code == 0, res.output
    assert "score-1" in res.output and "tag check" in res.output and "ok" in res.output
    assert "digits:000000011" not in res.output  # ids only with --ids
    res = invoke("release", "show", "digits-candidate-1", "--ids", "--json", "-w", workspace)
    doc = json.loads(res.output)
    assert doc["intact"] is True and len(doc["manifest"]["kept_ids"]) == 10
    assert doc["manifest"]["removed_ids"] == ["digits:000000000", "digits:000000001"]


def test_empty_workspace_lists_nothing(workspace):
    res = invoke("release", "list", "-w", workspace)
    assert res.exit_code == 0 and "no candidate releases yet" in res.output


def test_approve_then_approving_again_is_refused(ws):
    workspace, store, ledger = ws
    res = invoke("release", "approve", "digits-candidate-1", "--actor", "ann",
                 "--comment", "gates passed", "-w", workspace)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "released as digits-release-1" in res.output
    assert "digits-release-1" in tags(store)
    version = ledger.release("digits-release-1")["lance_version"]
    res = invoke("release", "approve", "digits-candidate-1", "--actor", "bob", "-w", workspace)
    assert res.exit_code == 2 and "already approved" in res.output
    res = invoke("release", "reject", "digits-candidate-1", "--actor", "bob", "-w", workspace)
    assert res.exit_code == 2 and "already approved" in res.output
    assert ledger.release("digits-release-1")["lance_version"] == version
    assert [(d["action"], d["actor"], d["comment"]) for d in ledger.decisions()] == [
        ("approve", "ann", "gates passed")
    ]
    res = invoke("release", "list", "-w", workspace)
    assert "approved" in res.output and "released" in res.output


def test_reject_leaves_no_release_tag_and_refuses_a_later_approval(ws):
    workspace, store, ledger = ws
    res = invoke("release", "reject", "digits-candidate-1", "-c", "audit skew",
                 "-w", workspace, env={"USER": "carol"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "rejected digits-candidate-1 by carol" in res.output
    res = invoke("release", "approve", "digits-candidate-1", "--actor", "ann", "-w", workspace)
    assert res.exit_code == 2 and "already rejected" in res.output
    assert tags(store) == {"digits-candidate-1", "digits-candidate-2"}
    assert [(d["action"], d["actor"], d["comment"]) for d in ledger.decisions()] == [
        ("reject", "carol", "audit skew")
    ]


def test_failed_gates_need_override_with_comment(ws):
    workspace, store, _ = ws
    res = invoke("release", "approve", "digits-candidate-2", "--actor", "ann", "-c", "looks fine",
                 "-w", workspace)  # fmt: skip
    assert res.exit_code == 2 and "failed its gates" in res.output
    res = invoke("release", "approve", "digits-candidate-2", "--actor", "ann", "--override",
                 "-w", workspace)  # fmt: skip
    assert res.exit_code == 2 and "needs a comment" in res.output
    assert "digits-release-2" not in tags(store)
    res = invoke("release", "approve", "digits-candidate-2", "--actor", "ann", "--override",
                 "-c", "FD within noise", "-w", workspace)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "digits-release-2" in tags(store)


def test_unknown_tag_and_missing_actor_are_refused(ws):
    workspace, _, ledger = ws
    for args in (("show",), ("approve", "--actor", "a"), ("reject", "--actor", "a")):
        res = invoke("release", *args, "digits-candidate-9", "-w", workspace)
        cmd = args[0]
        assert res.exit_code == 2, (cmd, res.output)
        assert "no candidate or release tagged 'digits-candidate-9'" in res.output
    res = invoke("release", "approve", "digits-candidate-1", "-w", workspace, env={"USER": ""})
    assert res.exit_code == 2 and "no --actor given" in res.output
    assert ledger.decisions() == []


def test_show_exits_1_when_a_tag_was_moved_outside_diffcurate(ws):
    workspace, store, ledger = ws
    res = invoke("release", "approve", "digits-candidate-1", "--actor", "ann", "-c", "ok",
                 "-w", workspace)  # fmt: skip
    assert res.exit_code == 0, res.output
    later = ledger.release("digits-candidate-2")["lance_version"]
    store.db.open_table("release_digits").tags.update("digits-release-1", later)
    res = invoke("release", "show", "digits-release-1", "-w", workspace)
    assert res.exit_code == 1 and "moved outside diffcurate" in res.output
