"""The eval flow (``diffcurate eval``): every scorer pruned at one budget, mitigated, measured."""

import math

import numpy as np
import pytest

from diffcurate.curation.flag import FlagPolicy, select_removals
from diffcurate.curation.groups import collapse_groups
from diffcurate.curation.measure import MeasureConfig, measure_model
from diffcurate.flows.evaluate import EvalParams, eval_flow
from diffcurate.flows.hygiene import duplicate_group_of
from diffcurate.influence.registry import ScorerSpec
from diffcurate.metrics.memorization import MemorizationPolicy
from diffcurate.mitigation import MitigationConfig
from diffcurate.models.diffusion import load_diffusion_model, save_diffusion_model
from diffcurate.models.images import images_for_unet
from diffcurate.models.reference import reference_model
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from workspaces import ingest_samples

pytestmark = pytest.mark.usefixtures("prefect_harness")

MEASURE = MeasureConfig(generations=24, inference_steps=4, kid_subsets=5, kid_subset_size=10,
                        memorization=MemorizationPolicy(threshold=0.2))  # fmt: skip
MITIGATIONS = [
    MitigationConfig(method="finetune", batch_size=16),
    MitigationConfig(method="retrain", retrain_steps=4, batch_size=16),
]
SECRETS = ["000000005", "000000007"]  # digit 5 is in the corpus 4 times (3 exact copies)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digit_files):
    root = tmp_path_factory.mktemp("eval")
    ws = ingest_samples(root, digit_files)  # 60 digits + 3 exact copies of digit 5
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), root / "model")
    samples_version = LanceStore(str(ws / "lancedb")).table("samples").version
    params = EvalParams(
        dataset="digits", model=model_dir, workspace=ws, secrets=SECRETS,
        scorers=[ScorerSpec(signal="loss"), ScorerSpec(signal="random", seed=3)],
        flag=FlagPolicy(fraction=0.05), mitigations=MITIGATIONS, measure=MEASURE,
        progress=False,
    )  # fmt: skip
    return ws, model_dir, params, eval_flow(params), samples_version


def test_one_row_per_scorer_and_mitigation_plus_the_controls(evaluated):
    *_, summary, _ = evaluated
    got = [(r.scorer, r.mitigation) for r in summary.rows]
    assert got == [("original", "-"), ("none", "finetune"), ("none", "retrain"),
                   ("loss", "finetune"), ("loss", "retrain"),
                   ("random", "finetune"), ("random", "retrain")]  # fmt: skip
    assert summary.n_samples == 63 and summary.mem_tau == pytest.approx(0.2)
    for r in summary.rows:
        assert 0.0 <= r.mem_percent <= 100.0 and math.isfinite(r.fd) and r.fd > 0


def test_original_row_equals_a_direct_measurement(evaluated):
    ws, model_dir, _, summary, _ = evaluated
    store = LanceStore(str(ws / "lancedb"))
    model = load_diffusion_model(model_dir)
    every = images_for_unet(store, "digits", model.unet)
    by_key = dict(zip(*store.read("samples", "digits", columns=["key", "sample_id"])
                      .to_pydict().values(), strict=True))  # fmt: skip
    secret_ids = [by_key[k] for k in SECRETS]
    secrets = images_for_unet(store, "digits", model.unet, secret_ids).pixels
    # the flow's reference without a held-out set: up to 1,000 seeded picks of the samples
    pick = sorted(np.random.default_rng(MEASURE.seed).choice(63, size=63, replace=False))
    direct = measure_model(model, secrets, secret_ids, every.pixels[pick], MEASURE)
    row = summary.row("original", "-")
    assert row.mem_percent == direct.mem.mem_percent
    assert row.fd == pytest.approx(direct.fd, rel=1e-9)
    assert row.kid == pytest.approx(direct.kid.mean, rel=1e-9, abs=1e-12)


def test_each_scorer_removes_its_own_top_budget_of_distinct_images(evaluated):
    """Recomputed from the scores table with the flag step: same images, copies removed
    whole, and the secrets counted among the removed samples."""
    ws, _, _, summary, _ = evaluated
    store = LanceStore(str(ws / "lancedb"))
    group_of = duplicate_group_of(store, "digits", "exact")
    by_key = dict(zip(*store.read("samples", "digits", columns=["key", "sample_id"])
                      .to_pydict().values(), strict=True))  # fmt: skip
    secret_ids = {by_key[k] for k in SECRETS}
    runs = set()
    for scorer in ("loss", "random"):
        rows = [summary.row(scorer, m.method) for m in MITIGATIONS]
        assert len({r.score_run for r in rows}) == 1  # scored once, mitigated twice
        table = store.read("scores", columns=["sample_id", "score"],
                           where={"run_id": rows[0].score_run})  # fmt: skip
        collapsed = collapse_groups(table.column("sample_id").to_pylist(),
                                    table.column("score").to_numpy(), group_of)  # fmt: skip
        flagged = select_removals(collapsed.representatives, collapsed.scores,
                                  policy=FlagPolicy(fraction=0.05)).flagged_ids  # fmt: skip
        removed = set(collapsed.expand(flagged))
        # 60 distinct images (digit 5 and its 3 copies are one): 5% of them is 3
        assert len(collapsed.representatives) == 60 and len(flagged) == 3
        for r in rows:
            assert (r.flagged_images, r.removed_samples) == (len(flagged), len(removed))
            assert r.secrets_removed == len(removed & secret_ids)
        runs.add(rows[0].score_run)
    assert len(runs) == 2


def test_ledger_holds_the_table_and_nothing_is_released(evaluated):
    ws, _, _, summary, samples_version = evaluated
    ledger = Ledger(ws / "ledger.duckdb")
    run = ledger.run(summary.run_id)
    assert run.kind == "eval" and run.status == "completed"
    assert run.stats["rows"] == [r.model_dump(mode="json") for r in summary.rows]
    assert run.params["secrets"] == SECRETS
    assert [r.status for r in ledger.runs(kind="score")] == ["completed", "completed"]
    assert ledger.releases() == []
    assert LanceStore(str(ws / "lancedb")).table("samples").version == samples_version


def test_unknown_secrets_fail_the_run(evaluated):
    ws, _, params, _, _ = evaluated
    with pytest.raises(ValueError, match="secrets not found"):
        eval_flow(params.model_copy(update={"secrets": ["no-such-key"]}))
    failed = [r for r in Ledger(ws / "ledger.duckdb").runs(kind="eval") if r.status == "failed"]
    assert len(failed) == 1 and "secrets not found" in failed[0].error
