"""What the reviewer and approver see: the reconstruction rule the run used, per-secret
verdicts, a flag threshold over distinct images, the score run's own scorer, the dependence
test beside the four-fifths chart, what pending marks change, and readable durations."""

from __future__ import annotations

import json
import re

import duckdb
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from dashboards.conftest import add_users, fresh_candidate, login
from dashboards.synthetic import build_synthetic
from diffcurate.dashboards import plots
from diffcurate.dashboards.app import create_app
from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import DUPLICATES


@pytest.fixture
def small(tmp_path):
    ws = tmp_path / "ws"
    info = build_synthetic(ws, "digits", n_samples=40, n_flagged=6)
    tokens = add_users(ws)
    return ws, info, LanceStore(str(ws / "lancedb")), Ledger(ws / "ledger.duckdb"), tokens


def client_for(ws, token):
    client = TestClient(create_app(ws), base_url="http://testserver")
    login(client, token)
    return client


def patch_run(ledger: Ledger, run_id: str, params: dict | None = None, **stats) -> None:
    """Rewrite a test run's params/stats (test set-up; the ledger API has no updates)."""
    run = ledger.run(run_id)
    with duckdb.connect(str(ledger.path)) as con:
        con.execute("UPDATE runs SET params = ?, stats = ? WHERE run_id = ?",
                    [json.dumps(params or run.params), json.dumps({**run.stats, **stats}),
                     run_id])  # fmt: skip


def test_gates_page_states_the_tau_the_run_used_and_each_secrets_verdict(small):
    ws, info, _, ledger, tokens = small
    run_id = info["run_id"]
    secrets = ledger.run(run_id).stats["secrets"]
    cal = {"fpr": 0.05, "n_images": 40, "observed_fpr": 0.025, "tau": 0.1399}
    patch_run(ledger, run_id, mem_tau=0.1399, mem_rule="tiled_l2", mem_calibration=cal,
              per_secret={secrets[0]: {"before": 0.05, "after": 0.3},
                          secrets[1]: {"before": 0.12, "after": 0.2},
                          secrets[2]: {"before": 0.2, "after": 0.25}})  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{run_id}/gates").text
    rule = re.search(r'<p id="mem-rule">(.*?)</p>', page, re.S).group(1)
    assert "τ = 0.1399" in rule and "calibrated" in rule and "0.08" not in rule
    assert "tiled_l2" in rule and "at most 5% of 40" in rule
    rows = page.split("<tbody>")[-1] if "<tbody>" in page else page
    verdicts = re.findall(r'<td class="reconstructed">(.*?)</td>', rows, re.S)
    said = [re.findall(r">(yes|no)<", v) for v in verdicts]
    # 0.12 < 0.1399 counts under the calibrated τ (it would not under the configured 0.1).
    assert said == [["yes", "no"], ["yes", "no"], ["no", "no"]]


def test_ratio_rule_is_stated_as_delta(small):
    ws, info, _, ledger, tokens = small
    patch_run(ledger, info["run_id"], mem_tau=1.39, mem_rule="relative_tiled_l2")
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/gates").text
    assert "δ = 1.39" in page and "distance ratio" in page and ">fixed<" not in page


def test_histogram_threshold_is_the_lowest_flagged_distinct_image(small):
    ws, info, store, ledger, tokens = small
    run = ledger.run(info["run_id"])
    scores = {
        r["sample_id"]: r["score"]
        for r in store.read("scores", where={"run_id": run.stats["score_run"]}).to_pylist()
    }
    removed, kept = info["removed"], info["kept"]
    top, low_copy = removed[0], min(kept, key=scores.get)
    # The lowest-scored kept image is an exact copy of the top flagged one: removed with it.
    store.insert_new("duplicates", pa.Table.from_pylist([
        {"sample_id": s, "dataset": "digits", "exact_group": "g-top", "exact_group_size": 2,
         "near_group": top, "near_group_size": 2, "near_method": "phash", "run_id": "ingest"}
        for s in (top, low_copy)
    ], schema=DUPLICATES))  # fmt: skip
    cand = rel.create_candidate(store, ledger, "digits", [k for k in kept if k != low_copy],
                                [*removed, low_copy], manifest={"gate_passed": True})  # fmt: skip
    patch_run(ledger, info["run_id"], params={**run.params, "scorer": {"signal": "divergence"}},
              release_tag=cand.tag)  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}").text
    shown = float(re.search(r"lowest flagged image ([0-9.e+-]+)<", page).group(1))
    expected = min(scores[s] for s in removed)
    assert shown == pytest.approx(expected, rel=1e-2)
    assert shown > scores[low_copy] + 1e-9  # not the removed copy's own low score
    # Every kept distinct image lies left of the line (no fairness cap in this run).
    assert all(scores[k] < expected for k in kept if k != low_copy)
    assert "kept images (33)" in page and "flagged (6)" in page  # 40 samples, 39 images
    # The score run's own scorer, not the hygiene run's default.
    assert "trace score" in page and "divergence score" not in page


def test_audit_page_explains_a_dependence_failure(small):
    ws, info, _, ledger, tokens = small
    groups = {"a": {"group": "a", "n": 20, "n_removed": 4, "removal_rate": 0.2,
                    "retention_rate": 0.8, "included": True},
              "b": {"group": "b", "n": 20, "n_removed": 1, "removal_rate": 0.05,
                    "retention_rate": 0.95, "included": True}}  # fmt: skip
    ledger.record_audit(info["run_id"], dataset="digits", attribute="slant", groups=groups,
                        passed=False, summary={"retention_ratio": 0.84, "test": "chi2",
                                               "p_value": 0.004, "p_value_holm": 0.008,
                                               "cramers_v": 0.3, "ratio_violation": False,
                                               "dependence_violation": True})  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/audit").text
    why = re.search(r'<p class="error-box audit-why">(.*?)</p>', page, re.S).group(1)
    assert "dependence test" in why and "0.008" in why and "α = 0.05" in why
    assert "four-fifths rule" not in why
    assert page.count('aria-label="dependence test (chi2)"') == 2  # one per attribute


def test_release_view_shows_what_pending_marks_change(small):
    ws, info, _, ledger, tokens = small
    tag = fresh_candidate(ws, info["tag"]).tag
    for sid in info["removed"][:2]:
        reviews.record_mark(ledger, tag, sample_id=sid, sample_ids=[sid], mark="keep",
                            actor="reviewer", role="reviewer")  # fmt: skip
    page = client_for(ws, tokens["approver"]).get(f"/releases/{tag}").text
    box = re.search(r'<div class="note" id="marks-change">(.*?)</div>', page, re.S).group(1)
    assert "digits-candidate-3" in box  # the candidate approving creates
    assert re.search(r"kept</th><td class=\"num\">34</td><td class=\"num\">36<", box)
    assert re.search(r"removed</th><td class=\"num\">6</td><td class=\"num\">4<", box)
    assert "2 flagged sample(s) put back" in box and "do not cover" in box
    assert 'id="override-reason"' in page
    button = re.search(r'<button type="submit" class="(\w+)">Approve with override', page)
    assert button and button.group(1) != "primary"


def test_durations_are_human_readable(small):
    ws, _, _, _, tokens = small
    assert plots.duration(4.26) == "4.3 s" and plots.duration(42) == "42 s"
    assert plots.duration(200) == "3 min 20 s" and plots.duration(7500) == "2 h 05 min"
    assert plots.duration(None) == "–"
    page = client_for(ws, tokens["viewer"]).get("/runs").text
    assert '<th class="num">duration</th>' in page
