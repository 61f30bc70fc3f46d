"""The audit page shows the counting unit, inferred attributes with what inferred them, the
other unit where the verdicts differ, and the generations audit (or why it was not measured)."""

from __future__ import annotations

import re

import pytest

from dashboards.conftest import add_users
from dashboards.synthetic import build_synthetic
from dashboards.test_reviewer_view import client_for, patch_run
from diffcurate.metrics.audit_units import audit_by_unit
from diffcurate.metrics.generations_audit import audit_generations
from diffcurate.storage.ledger import Ledger
from metrics.test_audit_units import planted


@pytest.fixture
def run(tmp_path):
    ws = tmp_path / "ws"
    info = build_synthetic(ws, "digits", n_samples=30, n_flagged=4)
    return ws, info, Ledger(ws / "ledger.duckdb"), add_users(ws)


def test_audit_page_shows_unit_inferred_provenance_and_the_other_unit(run):
    ws, info, ledger, tokens = run
    run_id = info["run_id"]
    frame, image_of = planted()
    audit = audit_by_unit(frame, ["skin"], image_of)
    a, other = audit.result.attributes[0], audit.other.attributes[0]
    summary = {**a.model_dump(mode="json", exclude={"groups"}), "unit": "images",
               "inferred_by": "inferred (zero-shot) by ViT-B-32@clip.pt [abc123]",
               "units_disagree": True, "unit_explanation": audit.comparisons[0].explanation,
               "other_unit": {"unit": "samples",
                              **other.model_dump(mode="json", exclude={"groups", "notes"}),
                              "groups": {g.group: g.model_dump(mode="json")
                                         for g in other.groups}}}  # fmt: skip
    ledger.record_audit(run_id, dataset="digits", attribute="skin", passed=True,
                        groups={g.group: g.model_dump(mode="json") for g in a.groups},
                        summary=summary)  # fmt: skip
    patch_run(ledger, run_id, audit_unit="images", audit_counts={"images": 200, "samples": 287})
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{run_id}/audit").text
    unit = re.search(r'<p class="note" id="audit-unit">(.*?)</p>', page, re.S).group(1)
    assert "distinct images" in unit and "200 distinct images, 287 samples" in unit
    assert "inferred (zero-shot) by ViT-B-32@clip.pt [abc123]" in page
    box = re.search(r'<div class="note units-disagree">(.*?)</div>', page, re.S).group(1)
    assert "Counted on samples this attribute would fail" in box
    assert "30.0 copies each" in box and '<td>B</td><td class="num">187</td>' in box
    assert "This run did not audit generations" in page


def test_audit_page_shows_the_generations_audit_and_its_failure(run):
    ws, info, ledger, tokens = run
    result = audit_generations({"faces": ["1"] * 20 + ["0"] * 20}, {"faces": ["0"] * 40})
    patch_run(ledger, info["run_id"], generations_audit={
        "result": result.model_dump(mode="json"), "generations": 40, "prompts": "",
        "inferred_by": {"faces": "inferred (faces) by opencv-4.14.0/haar [fp]"}, "skipped": [],
    })  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/audit").text
    section = page[page.index('id="generations"') :]
    assert "generated 40 images each from the same keyed noises" in section
    assert 'aria-label="share of generations by faces"' in section
    assert "&#39;1&#39; falls from 50.0%" in section or "'1' falls from 50.0%" in section
    assert "inferred (faces) by opencv-4.14.0/haar [fp]" in section
    assert re.search(r"<td>1</td><td class=\"num\">20</td><td class=\"num\">0</td>", section)
    patch_run(ledger, info["run_id"], generations_audit={"result": None,
                                                         "why": "nothing to infer"})  # fmt: skip
    page = client_for(ws, tokens["viewer"]).get(f"/runs/{info['run_id']}/audit").text
    assert "Generations audit not measured: nothing to infer" in page
