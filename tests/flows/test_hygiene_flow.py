"""The hygiene run end to end on ingested real digits with a saved tiny DDPM."""

import numpy as np
import pytest

from diffcurate.curation.gate import GatePolicy
from diffcurate.curation.measure import MeasureConfig, measure_model, to_unit
from diffcurate.demo.corpus import digit_samples
from diffcurate.flows import hygiene
from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
from diffcurate.influence.registry import ScorerSpec
from diffcurate.metrics.mem_calibration import calibrate_threshold
from diffcurate.metrics.memorization import MemorizationPolicy
from diffcurate.mitigation import MitigationConfig
from diffcurate.models.diffusion import load_diffusion_model, save_diffusion_model
from diffcurate.models.images import images_for_unet
from diffcurate.models.lance_data import LanceTrainingData
from diffcurate.models.reference import reference_model
from diffcurate.models.sample import generate
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import checkout, manifest_ids
from workspaces import ingest_samples

pytestmark = pytest.mark.usefixtures("prefect_harness")

MEASURE = MeasureConfig(generations=24, inference_steps=4, kid_subsets=5, kid_subset_size=10)


@pytest.fixture(scope="module")
def hygiene_run(tmp_path_factory, digit_files):
    root = tmp_path_factory.mktemp("hygiene")
    ws = ingest_samples(root, digit_files)  # 60 digits + 3 exact copies of digit 5
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), root / "model")
    store = LanceStore(str(ws / "lancedb"))
    samples_version = store.table("samples").version
    params = HygieneParams(
        dataset="digits", model=model_dir, workspace=ws, scorer=ScorerSpec(signal="loss"),
        mitigation=MitigationConfig(method="finetune", epochs=1, lr=2e-6, batch_size=16),
        measure=MEASURE, gate=GatePolicy(max_mem_percent_after=100.0),
        audit_attributes=["stroke", "slant"], progress=False,
    )  # fmt: skip
    STREAMED.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hygiene, "training_rows", _recording(hygiene.training_rows))
        summary = hygiene_flow(params)
    return ws, model_dir, params, summary, samples_version


STREAMED: list[LanceTrainingData] = []


def _recording(make):  # type: ignore[no-untyped-def]
    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        rows = make(*args, **kwargs)
        STREAMED.append(rows)
        return rows

    return wrapped


def test_the_fine_tune_streams_its_batches_from_lancedb(hygiene_run):
    """The kept samples are read per batch (steps x batch rows at most), never all at once."""
    _, _, params, summary, _ = hygiene_run
    (kept,) = STREAMED
    assert isinstance(kept, LanceTrainingData) and len(kept) == summary.n_kept
    steps = params.mitigation.steps_for(summary.n_kept)
    assert steps == -(-summary.n_kept // 16)
    assert 0 < kept.rows_decoded <= steps * params.mitigation.batch_size


def test_removal_set_is_whole_duplicate_groups(hygiene_run):
    ws, _, _, summary, _ = hygiene_run
    assert summary.n_samples == 63
    assert summary.n_removed + summary.n_kept == 63
    # ceil(1% of 61 distinct images) = 1 image flagged; if it is the quadruplicated digit,
    # all 4 copies go, otherwise exactly one sample.
    assert summary.n_flagged_images == 1
    ids = manifest_ids(Ledger(ws / "ledger.duckdb"), summary.release_tag)
    dup = LanceStore(str(ws / "lancedb")).read("duplicates", "digits").to_pylist()
    groups = {r["sample_id"]: r["exact_group"] for r in dup}
    removed_groups = {groups.get(i, i) for i in ids["removed"]}
    assert len(removed_groups) == 1
    members = [i for i in groups if groups[i] in removed_groups] or ids["removed"]
    assert sorted(ids["removed"]) == sorted(members)


def test_release_candidate_holds_the_kept_samples_and_samples_is_unchanged(hygiene_run):
    ws, _, _, summary, samples_version = hygiene_run
    store = LanceStore(str(ws / "lancedb"))
    assert store.table("samples").version == samples_version
    assert store.count("samples", "digits") == 63
    ledger = Ledger(ws / "ledger.duckdb")
    kept = checkout(store, ledger, summary.release_tag, columns=["sample_id"])
    got = sorted(kept.column("sample_id").to_pylist())
    assert got == sorted(manifest_ids(ledger, summary.release_tag)["kept"])
    assert len(got) == summary.n_kept
    assert summary.release_tag == "digits-candidate-1"


def test_ledger_holds_every_step(hygiene_run):
    ws, _, params, summary, _ = hygiene_run
    ledger = Ledger(ws / "ledger.duckdb")
    run = ledger.run(summary.run_id)
    assert run.status == "completed" and run.kind == "hygiene"
    assert ledger.run(summary.score_run).status == "completed"
    audits = ledger.audits(summary.run_id)
    assert sorted(a["attribute"] for a in audits) == ["slant", "stroke"]
    checks = ledger.gate_checks(summary.run_id)
    assert [c["name"] for c in checks] == [g["name"] for g in summary.gates]
    assert all(c["policy_version"] == params.gate.version for c in checks)
    assert summary.gate_table_errors == []
    stages = ["score", "flag", "audit", "mitigate", "measure before", "measure after",
              "audit generations", "gate", "release"]  # fmt: skip
    assert list(summary.stage_seconds) == stages
    assert all(v >= 0 for v in summary.stage_seconds.values())
    assert sum(summary.stage_seconds.values()) <= summary.seconds + 1e-3


def test_gate_measurements_equal_a_direct_computation(hygiene_run):
    ws, model_dir, _, summary, _ = hygiene_run
    store = LanceStore(str(ws / "lancedb"))
    model = load_diffusion_model(model_dir)
    secrets = images_for_unet(store, "digits", model.unet, summary.secrets).pixels
    ledger = Ledger(ws / "ledger.duckdb")
    kept = manifest_ids(ledger, summary.release_tag)["kept"]
    kept_in_order = [
        i for i in store.read("samples", "digits", columns=["sample_id"]).column("sample_id")
        .to_pylist() if i in set(kept)
    ]  # fmt: skip
    ref_pixels = images_for_unet(store, "digits", model.unet, kept_in_order).pixels
    assert summary.reference.startswith(f"{len(kept)} kept training images")
    direct = measure_model(model, secrets, summary.secrets, ref_pixels, MEASURE)
    assert summary.before["mem_percent"] == pytest.approx(direct.mem.mem_percent)
    assert summary.before["fd"] == pytest.approx(direct.fd, rel=1e-9)
    # Reviewers see each secret's closest generation, before and after.
    for phase in ("before", "after"):
        saved = sorted(p.stem for p in (ws / "runs" / summary.run_id / "gate" / phase).iterdir())
        assert saved == sorted(summary.secrets)
    first = summary.secrets[0]
    assert summary.per_secret[first]["before"] == pytest.approx(direct.mem.secrets[0].best_value)
    candidate = load_diffusion_model(summary.candidate_model)
    # A surgical fine-tune moves the weights, but only a little.
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(model.unet.parameters(), candidate.unet.parameters(), strict=True)
    ]
    assert 0 < max(diffs) < 1e-3
    assert np.isfinite(summary.after["fd"])


def test_unknown_secret_is_refused(hygiene_run):
    ws, _, params, _, _ = hygiene_run
    bad = params.model_copy(update={"secrets": ["no-such-key"], "score_run": None})
    with pytest.raises(ValueError, match="secrets not found"):
        hygiene_flow(bad)
    statuses = sorted(r.status for r in Ledger(ws / "ledger.duckdb").runs(kind="hygiene"))
    assert statuses == ["completed", "failed"]


def test_heldout_reference_and_calibrated_tau_judge_both_models(hygiene_run, tmp_path):
    """With a held-out dataset, FD/KID and τ come from images the model never saw; τ is
    calibrated once on the model before mitigation and the same τ judges the candidate."""
    ws, model_dir, params, first, _ = hygiene_run
    held_out = digit_samples(n_duplicated=0, copies=1)[0][1000:1040]
    ingest_samples(tmp_path, held_out, dataset="heldout", ws=ws)
    measure = MEASURE.model_copy(update={"calibrate_fpr": 0.1})
    update = {"score_run": first.score_run, "heldout_dataset": "heldout", "measure": measure}
    summary = hygiene_flow(params.model_copy(update=update))
    assert summary.reference == "40 images of held-out dataset 'heldout'"

    store = LanceStore(str(ws / "lancedb"))
    model = load_diffusion_model(model_dir)
    held = images_for_unet(store, "heldout", model.unet).pixels
    secrets = images_for_unet(store, "digits", model.unet, summary.secrets).pixels
    direct = measure_model(model, secrets, summary.secrets, held, measure, calibration_images=held)

    gens = generate(model, measure.generations, seed=measure.seed,
                    num_inference_steps=measure.inference_steps)  # fmt: skip
    cal = calibrate_threshold(to_unit(gens), to_unit(held), MemorizationPolicy(), 0.1)
    assert direct.calibration == cal
    assert summary.mem_tau == pytest.approx(cal.tau)
    assert summary.mem_calibration["n_images"] == 40 and summary.mem_calibration["fpr"] == 0.1
    assert summary.before["fd"] == pytest.approx(direct.fd, rel=1e-9)
    # The candidate is judged by the same τ: its Mem% is recomputable from its closest values.
    after = [v["after"] for v in summary.per_secret.values()]
    assert summary.after["mem_percent"] == pytest.approx(
        100 * np.mean([a < summary.mem_tau for a in after])
    )
    checks = Ledger(ws / "ledger.duckdb").gate_checks(summary.run_id)
    assert all(c["inputs"]["mem_tau"] == pytest.approx(cal.tau) for c in checks)
