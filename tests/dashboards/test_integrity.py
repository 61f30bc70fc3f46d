"""Tamper evidence on the dashboard: a moved or deleted Lance tag shows as tampered on the
releases list and the release page; a decision row deleted by hand is reported and nothing can
be decided on that ledger."""

from __future__ import annotations

import duckdb
import pytest
from fastapi.testclient import TestClient

from dashboards.conftest import add_users, fresh_candidate, login
from dashboards.synthetic import build_synthetic
from diffcurate.curation import approval
from diffcurate.dashboards.app import create_app
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger


@pytest.fixture
def small(tmp_path):
    ws = tmp_path / "ws"
    info = build_synthetic(ws, "digits", n_samples=40, n_flagged=6)
    tokens = add_users(ws)
    client = TestClient(create_app(ws), base_url="http://testserver")
    csrf = login(client, tokens["approver"])
    return ws, info, LanceStore(str(ws / "lancedb")), Ledger(ws / "ledger.duckdb"), client, csrf


def test_a_moved_release_tag_shows_as_tampered(small):
    ws, info, store, ledger, client, _ = small
    done = approval.approve(store, ledger, info["tag"], "approver", "ok", override_reason="r")
    released = done.release.tag
    page = client.get("/releases").text
    assert "tampered" not in page
    other = fresh_candidate(ws, info["tag"])
    store.db.open_table(done.release.lance_table).tags.update(released, other.lance_version)
    rows = client.get("/releases").text.split("<tr>")
    row = next(r for r in rows if f'/releases/{released}"' in r)
    assert "st-tampered" in row and "moved outside diffcurate" in row
    assert "st-released" not in row
    page = client.get(f"/releases/{released}").text
    assert 'id="tag-problem"' in page and "moved outside diffcurate" in page
    assert "pill st-released" not in page
    # A deleted tag too.
    store.db.open_table(other.lance_table).tags.delete(other.tag)
    page = client.get(f"/releases/{other.tag}").text
    assert 'id="tag-problem"' in page and "has no Lance tag" in page


def test_a_deleted_decision_row_is_reported_and_blocks_decisions(small):
    _ws, info, store, ledger, client, csrf = small
    tag = info["tag"]
    approval.reject(store, ledger, tag, "approver", "memorizes secrets")
    with duckdb.connect(str(ledger.path)) as con:
        con.execute("DELETE FROM decisions WHERE action = 'reject'")
    page = client.get(f"/releases/{tag}").text
    assert 'id="chain-broken"' in page and "altered outside diffcurate" in page
    assert 'id="approve-form"' not in page
    assert 'id="chain-broken"' in client.get("/releases").text
    r = client.post(f"/releases/{tag}/approve", follow_redirects=False,
                    data={"comment": "ok", "override_reason": "r", "csrf_token": csrf})  # fmt: skip
    assert r.status_code == 409 and "altered outside diffcurate" in r.text
    assert ledger.decisions() == [] and [r["kind"] for r in ledger.releases()] == ["candidate"]
