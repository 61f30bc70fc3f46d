"""The hygiene run with the re-trigger probe on a pixel-space (unconditional) model: nothing to
perturb, so the gate records the check as not applicable instead of failing or inventing a
number. (Text-conditional models through the same flow: ``tests/test_cli_t2i.py``.)"""

import pytest

from diffcurate.curation.gate import GatePolicy
from diffcurate.curation.measure import MeasureConfig
from diffcurate.curation.retrigger import UNCONDITIONAL_SKIP
from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
from diffcurate.influence.registry import ScorerSpec
from diffcurate.models.diffusion import save_diffusion_model
from diffcurate.models.reference import reference_model
from diffcurate.models.retrigger import RetriggerConfig
from diffcurate.storage.ledger import Ledger
from workspaces import ingest_samples

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_unconditional_model_records_the_retrigger_check_as_not_applicable(tmp_path, digit_files):
    ws = ingest_samples(tmp_path, digit_files)
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), tmp_path / "model")
    measure = MeasureConfig(generations=8, inference_steps=2, kid_subsets=2, kid_subset_size=4,
                            retrigger=RetriggerConfig(enabled=True, opt_steps=1))  # fmt: skip
    params = HygieneParams(
        dataset="digits", model=model_dir, workspace=ws, scorer=ScorerSpec(signal="loss"),
        measure=measure, progress=False,
        gate=GatePolicy(max_mem_percent_after=100.0, max_retrigger_mem_percent_after=0.0),
    )  # fmt: skip
    summary = hygiene_flow(params)
    assert summary.retrigger is not None and summary.retrigger["skipped"] == UNCONDITIONAL_SKIP
    assert summary.retrigger["mem_percent"] == {"before": None, "after": None}
    assert "retrigger_mem_percent" not in summary.before
    gate = {c["name"]: c for c in summary.gates}["memorization_retrigger"]
    assert gate["passed"] and gate["reason"] == f"not applicable: {UNCONDITIONAL_SKIP}"
    assert not summary.gate_table_errors
    checks = {c["name"] for c in Ledger(ws / "ledger.duckdb").gate_checks(summary.run_id)}
    assert "memorization_retrigger" in checks
