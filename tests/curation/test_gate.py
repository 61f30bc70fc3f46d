"""Release gate: pass/fail on constructed measurements, fail-closed on missing ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from diffcurate.curation.gate import GatePolicy, evaluate_gates
from diffcurate.metrics.audit import audit_arrays
from diffcurate.metrics.memorization import mem_percent
from diffcurate.metrics.retrigger import RetriggerResult
from diffcurate.metrics.utility import KIDResult

GOOD = {"mem_before": 40.0, "mem_after": 5.0, "fd_before": 10.0, "fd_after": 10.5, "audit": True}


def check(decision, name):
    return next(c for c in decision.checks if c.name == name)


def test_good_candidate_passes_every_check():
    decision = evaluate_gates(**GOOD)
    assert decision.passed and decision.failed == []
    assert [c.name for c in decision.checks] == [
        "memorization",
        "memorization_no_increase",
        "utility_fd",
        "audit",
    ]
    fd = check(decision, "utility_fd")
    assert (fd.value_before, fd.value_after, fd.threshold) == (10.0, 10.5, 0.10)
    assert fd.compared == pytest.approx(0.05)
    assert decision.summary == "gate PASS under policy gate-v3"


def test_memorization_limit():
    decision = evaluate_gates(**{**GOOD, "mem_after": 12.0})
    assert not decision.passed and decision.failed == ["memorization"]
    mem = check(decision, "memorization")
    assert (mem.value_before, mem.value_after, mem.threshold) == (40.0, 12.0, 10.0)
    assert "12.00 > limit 10.00" in mem.reason
    looser = GatePolicy(max_mem_percent_after=15.0)
    assert evaluate_gates(looser, **{**GOOD, "mem_after": 12.0}).passed


def test_memorization_must_not_increase():
    decision = evaluate_gates(**{**GOOD, "mem_before": 2.0, "mem_after": 5.0})
    assert decision.failed == ["memorization_no_increase"]
    assert check(decision, "memorization_no_increase").compared == pytest.approx(3.0)
    lenient = GatePolicy(require_mem_no_increase=False)
    assert evaluate_gates(lenient, **{**GOOD, "mem_before": 2.0, "mem_after": 5.0}).passed


def test_relative_fd_increase_boundary():
    at_limit = evaluate_gates(**{**GOOD, "fd_before": 100.0, "fd_after": 110.0})
    assert at_limit.passed and check(at_limit, "utility_fd").compared == pytest.approx(0.10)
    over = evaluate_gates(**{**GOOD, "fd_before": 100.0, "fd_after": 115.0})
    assert over.failed == ["utility_fd"] and "+15.0%" in check(over, "utility_fd").reason
    better = evaluate_gates(**{**GOOD, "fd_before": 100.0, "fd_after": 80.0})
    assert better.passed and check(better, "utility_fd").compared == pytest.approx(-0.2)
    zero = evaluate_gates(**{**GOOD, "fd_before": 0.0, "fd_after": 0.1})
    assert zero.failed == ["utility_fd"] and check(zero, "utility_fd").compared == math.inf


def test_failed_audit_blocks_with_its_violations():
    removed = np.r_[np.ones(30, bool), np.zeros(70, bool), np.zeros(100, bool)]
    groups = ["a"] * 100 + ["b"] * 100  # 'a' loses 30%, 'b' nothing
    audit = audit_arrays(removed, {"group": groups})
    assert not audit.passed
    decision = evaluate_gates(**{**GOOD, "audit": audit})
    assert decision.failed == ["audit"]
    reason = check(decision, "audit").reason
    assert reason.startswith("fairness audit failed: group: retention-rate ratio 0.700")
    assert evaluate_gates(GatePolicy(require_audit_pass=False), **{**GOOD, "audit": audit}).passed
    assert evaluate_gates(**{**GOOD, "audit": False}).failed == ["audit"]


def test_missing_or_nan_measurements_fail_closed():
    decision = evaluate_gates(**{**GOOD, "fd_after": None, "audit": None})
    assert decision.failed == ["utility_fd", "audit"]
    assert all("not measured" in check(decision, n).reason for n in decision.failed)
    nan = evaluate_gates(**{**GOOD, "mem_after": float("nan")})
    assert nan.failed == ["memorization", "memorization_no_increase"]


def test_kid_check_only_when_configured():
    assert "utility_kid" not in [c.name for c in evaluate_gates(**GOOD).checks]
    policy = GatePolicy(max_kid_increase=0.01, version="strict-2")
    kid0 = KIDResult(mean=0.002, std=0.001, subsets=10, subset_size=100)
    ok = evaluate_gates(policy, **GOOD, kid_before=kid0, kid_after=0.008)
    assert ok.passed and check(ok, "utility_kid").compared == pytest.approx(0.006)
    bad = evaluate_gates(policy, **GOOD, kid_before=kid0, kid_after=0.02)
    assert bad.failed == ["utility_kid"]
    assert bad.summary == "gate FAIL (utility_kid) under policy strict-2"
    assert evaluate_gates(policy, **GOOD).failed == ["utility_kid"]  # not measured


def test_mem_results_are_accepted():
    rng = np.random.default_rng(0)
    secrets = rng.random((4, 8, 8))
    before = mem_percent(secrets.copy(), secrets)  # every secret reproduced: 100%
    after = mem_percent(rng.random((4, 8, 8)), secrets)  # noise: 0%
    decision = evaluate_gates(**{**GOOD, "mem_before": before, "mem_after": after})
    mem = check(decision, "memorization")
    assert (mem.value_before, mem.value_after) == (100.0, 0.0) and decision.passed


def test_policy_is_frozen_and_validated():
    policy = GatePolicy()
    with pytest.raises(ValidationError):
        policy.max_relative_fd_increase = 1.0
    with pytest.raises(ValidationError):
        GatePolicy(max_mem_percent_after=150.0)
    dumped = evaluate_gates(**GOOD).model_dump()
    assert dumped["policy"]["version"] == "gate-v3" and len(dumped["checks"]) == 4


def test_retrigger_check_only_when_probed_or_limited():
    names = [c.name for c in evaluate_gates(**GOOD).checks]
    assert "memorization_retrigger" not in names
    probed = evaluate_gates(**GOOD, retrigger_before=50.0, retrigger_after=25.0,
                            retrigger_probed=True)  # fmt: skip
    assert [c.name for c in probed.checks][:3] == [
        "memorization", "memorization_no_increase", "memorization_retrigger",
    ]  # fmt: skip


def test_retrigger_without_a_limit_is_recorded_but_does_not_block():
    decision = evaluate_gates(**GOOD, retrigger_before=50.0, retrigger_after=100.0,
                              retrigger_probed=True)  # fmt: skip
    rt = check(decision, "memorization_retrigger")
    assert decision.passed and rt.passed
    assert (rt.value_before, rt.value_after, rt.threshold) == (50.0, 100.0, None)
    assert "not blocking" in rt.reason and "100.00" in rt.reason


def test_retrigger_limit_blocks():
    policy = GatePolicy(max_retrigger_mem_percent_after=10.0)
    ok = evaluate_gates(policy, **GOOD, retrigger_before=80.0, retrigger_after=10.0)
    assert ok.passed and check(ok, "memorization_retrigger").compared == 10.0
    bad = evaluate_gates(policy, **GOOD, retrigger_before=80.0, retrigger_after=60.0)
    assert bad.failed == ["memorization_retrigger"]
    assert (
        "re-trigger Mem% after 60.00 (before 80.00) > limit 10.00"
        in check(bad, "memorization_retrigger").reason
    )
    result = RetriggerResult(metric="tiled_l2", threshold=0.08, n_secrets=4, n_retriggered=1)
    assert evaluate_gates(policy, **GOOD, retrigger_after=result).failed == [
        "memorization_retrigger"
    ]  # 25% > 10%
    assert evaluate_gates(GatePolicy(max_retrigger_mem_percent_after=25.0), **GOOD,
                          retrigger_after=result).passed  # fmt: skip


def test_retrigger_not_measured_fails_closed():
    # Asked for (probe enabled) but missing: fails even without a limit.
    probed = evaluate_gates(**GOOD, retrigger_probed=True)
    assert probed.failed == ["memorization_retrigger"]
    assert "not measured" in check(probed, "memorization_retrigger").reason
    nan = evaluate_gates(**GOOD, retrigger_after=float("nan"), retrigger_probed=True)
    assert nan.failed == ["memorization_retrigger"]
    # A limit in the policy with no probe run fails too: the policy demands the measurement.
    limited = GatePolicy(max_retrigger_mem_percent_after=10.0)
    assert evaluate_gates(limited, **GOOD).failed == ["memorization_retrigger"]


def test_retrigger_is_not_applicable_to_unconditional_models():
    skipped = RetriggerResult(skipped="unconditional model: no caption embedding to perturb")
    policy = GatePolicy(max_retrigger_mem_percent_after=0.0)
    decision = evaluate_gates(policy, **GOOD, retrigger_before=skipped, retrigger_after=skipped,
                              retrigger_probed=True)  # fmt: skip
    rt = check(decision, "memorization_retrigger")
    assert decision.passed and rt.passed and rt.value_after is None
    assert rt.reason == "not applicable: unconditional model: no caption embedding to perturb"
    with pytest.raises(ValidationError):
        GatePolicy(max_retrigger_mem_percent_after=101.0)
