"""What the CLI prints from user data: rich markup is shown literally (never parsed, never a
crash), control characters never reach the terminal, and tampering is reported."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.cli.common import safe
from diffcurate.config import load_settings
from diffcurate.curation import approval
from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SAMPLES, SCORES
from storage.test_releases import sample_rows

runner = CliRunner()
MARKUP = "[bold red]FAKE[/] caption [/]"
ANSI = "ok\x1b[2K\x1b[1A\rapproved by ceo\x07 \x9b31m\u202eevil"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_safe_escapes_markup_and_strips_control_characters():
    assert safe("[bold red]x[/]") == "\\[bold red]x\\[/]"
    assert safe("a\tb\nc\rd") == "a b c d"
    cleaned = safe(ANSI)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in cleaned)
    assert "\u202e" not in cleaned and "approved by ceo" in cleaned
    assert safe("ends in a backslash \\").endswith("\\\\")  # cannot escape the next tag


@pytest.fixture
def ws(workspace, digit_files):
    """12 digits, 3 with hostile captions; a score run over them; one candidate."""
    settings = load_settings(workspace)
    store = LanceStore(settings.layout.lancedb_uri)
    ledger = Ledger(settings.layout.ledger_path)
    rows = sample_rows(digit_files[:12], "digits").to_pylist()
    for row, caption in zip(rows, (MARKUP, ANSI, "[/]"), strict=False):
        row["caption"] = caption
    store.insert_new("samples", pa.Table.from_pylist(rows, schema=SAMPLES))
    run = ledger.start_run("score", dataset="digits")
    now = datetime.now(UTC)
    store.insert_new("scores", pa.Table.from_pylist([
        {"score_id": f"{run}/{r['sample_id']}", "run_id": run, "dataset": "digits",
         "sample_id": r["sample_id"], "signal": "loss", "score": float(100 - i),
         "stderr": None if i % 2 else 0.1, "per_layer": None, "per_timestep": None,
         "method": "exact", "scored_at": now}
        for i, r in enumerate(rows)
    ], schema=SCORES))  # fmt: skip
    ledger.finish_run(run, status="completed")
    ids = sorted(r["sample_id"] for r in rows)
    cand = rel.create_candidate(store, ledger, "digits", ids[2:], ids[:2],
                                {"gate_passed": True, "note": MARKUP})  # fmt: skip
    return workspace, store, ledger, run, cand


def test_scores_top_prints_markup_captions_literally(ws):
    workspace, _, _, run, _ = ws
    res = invoke("scores", run, "--top", 5, "-w", workspace)
    assert res.exit_code == 0, res.output
    assert "[bold red]FAKE[/] caption [/]" in res.output
    assert "\x1b" not in res.output and "\r" not in res.output and "\x07" not in res.output
    assert "approved by ceo" in res.output


def test_release_show_prints_markup_and_strips_escapes_in_comments(ws):
    workspace, store, ledger, _, cand = ws
    approval.approve(store, ledger, cand.tag, "ann", ANSI + " " + MARKUP)
    for tag in (cand.tag, rel.release_tag("digits", cand.n)):
        res = invoke("release", "show", tag, "-w", workspace)
        assert res.exit_code == 0, res.output
        assert "\x1b" not in res.output and "\x07" not in res.output
        assert "FAKE[/] caption" in res.output and "tag check" in res.output
    res = invoke("release", "list", "-w", workspace)
    assert res.exit_code == 0 and "\x1b" not in res.output


def test_release_list_and_show_report_a_moved_tag_as_tampered(ws):
    workspace, store, ledger, _, cand = ws
    approval.approve(store, ledger, cand.tag, "ann", "ok")
    final = rel.release_tag("digits", cand.n)
    ids = sorted(rel.manifest_ids(ledger, cand.tag)["kept"] + rel.manifest_ids(ledger, cand.tag)[
        "removed"])  # fmt: skip
    other = rel.create_candidate(store, ledger, "digits", ids[5:], ids[:5])
    assert invoke("release", "list", "-w", workspace).exit_code == 0
    store.db.open_table(other.lance_table).tags.update(final, other.lance_version)
    res = invoke("release", "list", "-w", workspace)
    assert res.exit_code == 1
    line = next(s for s in res.output.splitlines() if final in s and "│" in s)
    assert "tampered" in line and "released" not in line
    assert "moved outside diffcurate" in res.output
    res = invoke("release", "list", "-w", workspace, "--json")
    assert res.exit_code == 1 and '"problem": "points at version' in res.output
    res = invoke("release", "show", final, "-w", workspace)
    assert res.exit_code == 1 and "tampered" in res.output


def test_a_deleted_reject_row_is_reported_and_blocks_the_release(ws):
    workspace, store, ledger, _, cand = ws
    approval.reject(store, ledger, cand.tag, "ann", "memorizes secrets")
    with duckdb.connect(str(ledger.path)) as con:
        con.execute("DELETE FROM decisions WHERE action = 'reject'")
    res = invoke("release", "show", cand.tag, "-w", workspace)
    assert res.exit_code == 1 and "altered outside diffcurate" in res.output
    assert "decisions chain" in res.output
    res = invoke("release", "list", "-w", workspace)
    assert res.exit_code == 1 and "altered outside diffcurate" in res.output
    res = invoke("release", "approve", cand.tag, "--actor", "ann", "-c", "ok", "-w", workspace)
    assert res.exit_code == 2 and "altered outside diffcurate" in res.output
    assert "Traceback" not in res.output
    assert [r["kind"] for r in ledger.releases()] == ["candidate"]
