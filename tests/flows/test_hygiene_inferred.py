"""The hygiene run audits inferred attributes beside the metadata, counts distinct images by
default (samples beside it), and audits both models' generations for the gate."""

from __future__ import annotations

import pandas as pd
import pytest

from diffcurate.config import AttributeSettings, ClipSettings
from diffcurate.curation.gate import GatePolicy
from diffcurate.curation.generations import GenerationsAuditConfig
from diffcurate.curation.inferred import infer_dataset
from diffcurate.curation.measure import MeasureConfig
from diffcurate.flows.gate_inputs import duplicate_group_of, metadata_frame
from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
from diffcurate.influence.registry import ScorerSpec
from diffcurate.metrics.audit_units import audit_by_unit
from diffcurate.mitigation import MitigationConfig
from diffcurate.models.diffusion import save_diffusion_model
from diffcurate.models.reference import reference_model
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import manifest_ids
from workspaces import ingest_samples

pytestmark = pytest.mark.usefixtures("prefect_harness")

MEASURE = MeasureConfig(generations=24, inference_steps=4, kid_subsets=5, kid_subset_size=10)
SHAPES = {"shape": {"round": ["zero", "six", "eight", "nine"], "straight": ["one", "seven"]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, digit_files, tiny_clip):
    root = tmp_path_factory.mktemp("hygiene-inferred")
    ws = ingest_samples(root, digit_files)  # 60 digits + 3 exact copies of digit 5
    store = LanceStore(str(ws / "lancedb"))
    infer_dataset(store, "digits", AttributeSettings(captions=SHAPES), ClipSettings(), "r0")
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), root / "model")
    gen = GenerationsAuditConfig(
        generations=24, clip=tiny_clip,
        attributes=AttributeSettings(zero_shot={"ink": ["a dark digit", "a light digit"]},
                                     threshold=0.0),
    )  # fmt: skip
    params = HygieneParams(
        dataset="digits", model=model_dir, workspace=ws, scorer=ScorerSpec(signal="loss"),
        mitigation=MitigationConfig(method="finetune", epochs=1, lr=2e-6, batch_size=16),
        measure=MEASURE, gate=GatePolicy(max_mem_percent_after=100.0),
        audit_attributes=["stroke", "shape"], generations_audit=gen, progress=False,
    )  # fmt: skip
    return ws, params, hygiene_flow(params)


def test_inferred_attribute_is_audited_on_distinct_images_with_provenance(run):
    ws, _, summary = run
    assert summary.audit_unit == "images"
    store = LanceStore(str(ws / "lancedb"))
    exact = duplicate_group_of(store, "digits", "exact")
    ids = store.read("samples", "digits", columns=["sample_id"]).column("sample_id").to_pylist()
    n_images = len({exact.get(i, i) for i in ids})  # the 3 planted copies, and sklearn's own
    assert n_images <= 61 and summary.audit_counts == {"images": n_images, "samples": 63}
    assert summary.inferred_attributes["shape"].startswith("inferred (caption) by caption-keywords")
    audits = {a["attribute"]: a for a in Ledger(ws / "ledger.duckdb").audits(summary.run_id)}
    shape = audits["shape"]["summary"]
    assert shape["unit"] == "images" and shape["n_units"] == n_images
    assert shape["inferred_by"] == summary.inferred_attributes["shape"]
    assert audits["stroke"]["summary"]["inferred_by"] is None
    assert shape["other_unit"]["unit"] == "samples"
    # The same audit computed directly from the release's removed ids.
    removed = set(manifest_ids(Ledger(ws / "ledger.duckdb"), summary.release_tag)["removed"])
    frame = metadata_frame(store.read("samples", "digits", columns=["sample_id", "key",
                                      "caption", "metadata"]).to_pylist())  # fmt: skip
    shapes = store.read("inferred_attributes", "digits", columns=["sample_id", "value"],
                        where={"attribute": "shape"})  # fmt: skip
    frame = frame.merge(pd.DataFrame({"sample_id": shapes.column("sample_id").to_pylist(),
                                      "shape": shapes.column("value").to_pylist()}),
                        on="sample_id")  # fmt: skip
    frame["removed"] = frame["sample_id"].isin(removed)
    direct = audit_by_unit(frame, ["stroke", "shape"], exact)
    groups = {g.group: (g.n, g.n_removed) for g in direct.result.attributes[1].groups}
    assert {k: (v["n"], v["n_removed"]) for k, v in audits["shape"]["groups"].items()} == groups
    other = {g.group: g.n for g in direct.other.attributes[1].groups}
    assert {k: v["n"] for k, v in shape["other_unit"]["groups"].items()} == other
    assert sum(other.values()) == 63 and sum(n for n, _ in groups.values()) == n_images


def test_generations_audit_reaches_the_gate(run):
    _, params, summary = run
    gen = summary.generations_audit
    result = gen["result"]
    assert result["n_before"] == result["n_after"] == 24
    assert [a["attribute"] for a in result["attributes"]] == ["ink", "faces"]
    assert gen["inferred_by"]["ink"].startswith("inferred (zero-shot) by diffcurate-test-clip")
    check = next(g for g in summary.gates if g["name"] == "generations_audit")
    assert check["passed"] == result["passed"]
    assert check["threshold"] == params.generations_audit.policy.min_share_ratio
    assert "audit generations" in summary.stage_seconds


def test_nothing_to_infer_on_generations_fails_the_gate_closed(run):
    _, params, first = run
    off = GenerationsAuditConfig(attributes=AttributeSettings(faces=False))
    summary = hygiene_flow(params.model_copy(update={"score_run": first.score_run,
                                                     "generations_audit": off}))  # fmt: skip
    check = next(g for g in summary.gates if g["name"] == "generations_audit")
    assert not check["passed"] and check["reason"].startswith("not measured")
    assert summary.generations_audit["result"] is None
    assert not summary.gate_passed
    # Samples as the unit: the samples audit decides, and it counts 63.
    samples = hygiene_flow(params.model_copy(update={
        "score_run": first.score_run, "audit_unit": "samples",
        "generations_audit": GenerationsAuditConfig(enabled=False)}))  # fmt: skip
    assert samples.audit_unit == "samples"
    assert "generations_audit" not in [g["name"] for g in samples.gates]
    assert samples.generations_audit is None
