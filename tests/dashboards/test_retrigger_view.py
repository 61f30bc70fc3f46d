"""The gates page shows the re-trigger check: its row with before/after values and limit, the
probe's summary and each secret's re-triggered verdict before → after, or why it did not apply."""

from __future__ import annotations

import re

import pytest

from dashboards.conftest import add_users
from dashboards.synthetic import build_synthetic
from dashboards.test_reviewer_view import client_for, patch_run
from diffcurate.storage.ledger import Ledger


@pytest.fixture
def run(tmp_path):
    ws = tmp_path / "ws"
    info = build_synthetic(ws, "digits", n_samples=30, n_flagged=4)
    return ws, info, Ledger(ws / "ledger.duckdb"), add_users(ws)


def secret_result(sid: str, retriggered: bool, probes: list[str], best: float) -> dict:
    return {"secret_id": sid, "retriggered": retriggered, "probes": probes,
            "best_probe": probes[0] if probes else "random-0", "best_value": best,
            "n_generations": 2, "loss_plain": 0.5, "loss_optimised": 0.01}  # fmt: skip


def test_gates_page_shows_the_retrigger_check_and_each_secrets_verdict(run):
    ws, info, ledger, tokens = run
    run_id = info["run_id"]
    a, b = ledger.run(run_id).stats["secrets"][:2]
    ledger.record_gate_check(
        run_id, name="memorization_retrigger", passed=False, policy_version="gate-v3",
        value_before=100.0, value_after=50.0, threshold=10.0,
        inputs={"reason": "re-trigger Mem% after 50.00 (before 100.00) > limit 10.00"},
    )  # fmt: skip
    patch_run(ledger, run_id, retrigger={
        "skipped": None, "probes": ["random-0", "optimised"],
        "mem_percent": {"before": 100.0, "after": 50.0},
        "seconds": {"before": 1.5, "after": 1.4},
        "per_secret": {
            a: {"before": secret_result(a, True, ["optimised"], 0.01),
                "after": secret_result(a, True, ["random-0", "optimised"], 0.02)},
            b: {"before": secret_result(b, True, ["optimised"], 0.03),
                "after": secret_result(b, False, [], 0.4)},
        },
    })  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{run_id}/gates").text
    row = re.search(r"<tr><td>memorization_retrigger</td>(.*?)</tr>", page, re.S)
    assert row is not None
    cells = re.findall(r'<td class="num">(.*?)</td>', row.group(1))
    assert cells == ["100", "50", "10"]
    assert "fail" in row.group(1) and "&gt; limit 10.00" in row.group(1)
    summary = re.search(r'<p id="retrigger-summary">(.*?)</p>', page, re.S).group(1)
    assert "<b>100</b> before → <b>50</b> after" in summary
    assert "random-0, optimised" in summary
    verdicts = re.findall(r'<td class="retriggered">(.*?)</td>', page, re.S)
    said = [re.findall(r">(yes|no)\b", v) for v in verdicts]
    assert said == [["yes", "yes"], ["yes", "no"]]
    assert "yes (random-0, optimised)" in verdicts[0]
    assert "0.5 (caption) → 0.01 (optimised)" in page
    assert "memorization_retrigger" in "".join(re.findall(r"<svg.*?</svg>", page, re.S))


def test_gates_page_says_why_the_probe_did_not_apply(run):
    ws, info, ledger, tokens = run
    patch_run(ledger, info["run_id"], retrigger={
        "skipped": "unconditional model: no caption embedding to perturb", "probes": [],
        "mem_percent": {"before": None, "after": None}, "seconds": {}, "per_secret": {},
    })  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/gates").text
    summary = re.search(r'<p class="muted" id="retrigger-summary">(.*?)</p>', page, re.S)
    reason = "unconditional model: no caption embedding to perturb"
    assert summary.group(1) == f"Not applicable: {reason}."
    assert 'class="retriggered"' not in page


def test_runs_without_the_probe_show_no_retrigger_section(run):
    ws, info, _, tokens = run
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/gates").text
    assert 'id="retrigger"' not in page
