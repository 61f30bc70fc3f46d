"""The gate's generations_audit check: a group erased from the candidate's outputs fails it;
asked for but not measured, it fails closed; not asked for, it is absent."""

from __future__ import annotations

import pytest

from diffcurate.curation.gate import GatePolicy, evaluate_gates
from diffcurate.metrics.generations_audit import GenerationsAuditPolicy, audit_generations

GOOD = {"mem_before": 40.0, "mem_after": 5.0, "fd_before": 10.0, "fd_after": 10.5, "audit": True}
BEFORE = {"gender": ["man"] * 100 + ["woman"] * 100}


def check(decision):
    return next(c for c in decision.checks if c.name == "generations_audit")


def test_erased_group_fails_the_gate_with_shares_and_threshold():
    result = audit_generations(BEFORE, {"gender": ["man"] * 200})
    decision = evaluate_gates(**GOOD, generations_audit=result, generations_audited=True)
    assert decision.failed == ["generations_audit"]
    c = check(decision)
    assert (c.value_before, c.value_after, c.compared, c.threshold) == (0.5, 0.0, 0.0, 0.5)
    assert "'woman' falls from 50.0%" in c.reason


def test_kept_shares_pass_and_the_threshold_is_the_audit_policy():
    after = {"gender": ["man"] * 130 + ["woman"] * 70}  # woman x0.7
    ok = evaluate_gates(**GOOD, generations_audit=audit_generations(BEFORE, after),
                        generations_audited=True)  # fmt: skip
    assert ok.passed and check(ok).compared == pytest.approx(0.7)
    strict = audit_generations(BEFORE, after, GenerationsAuditPolicy(min_share_ratio=0.8))
    bad = evaluate_gates(**GOOD, generations_audit=strict, generations_audited=True)
    assert bad.failed == ["generations_audit"] and check(bad).threshold == 0.8


def test_fails_closed_when_asked_for_and_absent_otherwise():
    missing = evaluate_gates(**GOOD, generations_audited=True)
    assert missing.failed == ["generations_audit"]
    assert check(missing).reason.startswith("not measured")
    assert "generations_audit" not in [c.name for c in evaluate_gates(**GOOD).checks]
    required = evaluate_gates(GatePolicy(require_generations_audit=True), **GOOD)
    assert required.failed == ["generations_audit"]
    assert GatePolicy().version == "gate-v3"
