"""The great-expectations suite of the gate table."""

import math

import pandas as pd

from diffcurate.storage.gate_validation import validate_gate_table


def _rows(**overrides):
    base = [
        {"name": "mem_after", "passed": True, "policy_version": "gate-v1",
         "value_before": 30.0, "value_after": 5.0, "threshold": 10.0},
        {"name": "audit", "passed": False, "policy_version": "gate-v1",
         "value_before": None, "value_after": 0.0, "threshold": None},
    ]  # fmt: skip
    base[0].update(overrides)
    return pd.DataFrame(base)


def test_a_well_formed_table_passes():
    assert validate_gate_table(_rows()) == []


def test_each_defect_is_reported():
    assert any("Unique" in f for f in validate_gate_table(_rows(name="audit")))
    assert any("policy_version" in f for f in validate_gate_table(_rows(policy_version=" ")))
    assert any("NotBeNull(passed)" in f for f in validate_gate_table(_rows(passed="yes")))
    assert "non-finite" in validate_gate_table(_rows(value_after=math.inf))[0]
    assert "lacks columns" in validate_gate_table(_rows().drop(columns=["threshold"]))[0]
    assert validate_gate_table(_rows().iloc[0:0]) == ["gate table is empty"]
