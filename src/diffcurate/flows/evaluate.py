"""The evaluation flow: which risk scorer's pruning removes memorization on YOUR data and model?

``benchmarks/table1.py`` answers that on a planted digits corpus; this flow is the same harness
for a user's own ingested dataset, model, secret set and budget (``diffcurate eval``). For every
scorer it runs the score flow (resumable, rows in ``scores``), flags the same budget through the
hygiene run's flag step (exact groups collapse to one image and are removed whole), produces a
candidate with each mitigation, and measures it as the gate does: Mem% of the secrets with one τ
(fixed, or calibrated once on the original model), FD and KID against real reference images.

Controls, so that a difference is the pruning's and not the mitigation's: the original model as
it is, and each mitigation applied to every sample (no pruning). Rows report how many secrets
each scorer's removal set contains (a ranking that finds them removes them).

Nothing is released: candidates are measured in memory and dropped; the run and its table go to
the ledger (kind ``eval``). Use ``diffcurate run`` with the chosen scorer to make a release.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.curation.flag import FlagPolicy
from diffcurate.curation.groups import GroupBy
from diffcurate.curation.measure import MeasureConfig, ModelMeasurement
from diffcurate.flows.gate_inputs import (
    duplicate_group_of,
    gate_images,
    metadata_frame,
    resolve_secrets,
)
from diffcurate.flows.hygiene import (
    flag_task,
    measure_task,
    mitigate_task,
    needs_neighbours,
    training_rows,
)
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.influence.registry import ScorerSpec
from diffcurate.mitigation import MitigationConfig
from diffcurate.models.images import Geometry
from diffcurate.models.load_options import LoadOptions
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.tasks.score import load_model
from diffcurate.workspace import Workspace

ORIGINAL = "original"
"""Scorer name of the row that measures the model as it is (no pruning, no mitigation)."""
NO_PRUNING = "none"
"""Scorer name of the control rows: each mitigation applied to every sample."""


class EvalParams(BaseModel):
    """Parameters of one evaluation run (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Dataset the model was trained on (as ingested).")
    model: Path = Field(description="Local diffusers model directory (or checkpoint file).")
    load: LoadOptions = Field(
        default_factory=LoadOptions,
        description="How the checkpoint is held: variant, dtype, LoRA adapters, single file.",
    )
    geometry: Geometry = Field(
        "center-crop", description="How non-square images become the model's square input."
    )
    secrets: list[str] = Field(min_length=1, description="Secret/canary sample keys or ids.")
    scorers: list[ScorerSpec] = Field(min_length=1, description="Scorers to compare.")
    workspace: Path = Path("workspace")
    flag: FlagPolicy = Field(default_factory=FlagPolicy, description="The budget, for all.")
    group_by: GroupBy = "exact"
    mitigations: list[MitigationConfig] = Field(
        default_factory=lambda: [MitigationConfig()], min_length=1
    )
    heldout_dataset: str | None = Field(
        None, description="Real held-out images for FD/KID; None = the dataset's own samples."
    )
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    shard_size: int = Field(256, ge=1)
    progress: bool = True


class EvalRow(BaseModel):
    """One scorer × mitigation: what was removed and how the candidate measures."""

    scorer: str
    mitigation: str
    score_run: str = ""
    flagged_images: int = 0
    removed_samples: int = 0
    secrets_removed: int = 0
    mem_percent: float
    fd: float
    kid: float
    retrigger_mem_percent: float | None = Field(
        None, description="Re-trigger Mem% (perturbed captions), when the probe ran."
    )
    score_seconds: float = 0.0
    mitigate_seconds: float = 0.0


class EvalSummary(BaseModel):
    """The evaluation table; stored as the run's ``stats`` in the ledger."""

    run_id: str
    dataset: str
    n_samples: int = 0
    secrets: list[str] = Field(default_factory=list)
    reference: str = ""
    mem_tau: float | None = None
    mem_rule: str = ""
    heldout_fpr: float | None = Field(
        None, description="Share of reference images the rule counts as reconstructed (original)."
    )
    rows: list[EvalRow] = Field(default_factory=list)
    seconds: float = 0.0

    def row(self, scorer: str, mitigation: str) -> EvalRow:
        """The row of ``scorer`` (or ``original`` / ``none``) under ``mitigation``."""
        for r in self.rows:
            if r.scorer == scorer and r.mitigation == mitigation:
                return r
        raise KeyError(f"no row for {scorer} + {mitigation}")


def _row(scorer: str, mitigation: str, m: ModelMeasurement, **kw: object) -> EvalRow:
    retrigger = None if m.retrigger is None else m.retrigger.mem_percent
    return EvalRow(scorer=scorer, mitigation=mitigation, mem_percent=m.mem.mem_percent,
                   fd=m.fd, kid=m.kid.mean, retrigger_mem_percent=retrigger, **kw)  # fmt: skip


@flow(name="eval", validate_parameters=True)
def eval_flow(params: EvalParams) -> EvalSummary:
    """Original → no-pruning controls → for each scorer: score → flag → mitigate → measure."""
    log = get_run_logger()
    started = time.perf_counter()
    ws = params.workspace
    layout = Workspace(ws)
    store = LanceStore.open(layout)
    ledger = Ledger(layout.ledger_path)
    if not params.model.exists():
        raise FileNotFoundError(f"model not found: {params.model}")
    with ledger.recording("eval", dataset=params.dataset, source=str(params.model),
                          params=params.model_dump(mode="json")) as run:  # fmt: skip
        summary = EvalSummary(run_id=run.run_id, dataset=params.dataset)
        run.stats = lambda: summary.model_dump(mode="json")
        samples = store.read("samples", params.dataset,
                             columns=["sample_id", "key", "caption", "metadata"])  # fmt: skip
        frame = metadata_frame(samples.to_pylist())
        all_ids = list(frame["sample_id"])
        summary.n_samples = len(all_ids)
        secret_ids, _ = resolve_secrets(params.secrets, frame, [])
        model = load_model(params.model, options=params.load)
        uncond = model.text_encoder.encode([""]) if model.text_encoder is not None else None
        images = gate_images(
            store, params.dataset, model, frame, secret_ids, training_ids=all_ids,
            heldout_dataset=params.heldout_dataset, seed=params.measure.seed,
            geometry=params.geometry, with_neighbours=needs_neighbours(params.measure, model),
        )  # fmt: skip
        summary.secrets, summary.reference = images.secret_ids, images.reference_described

        def measure(candidate, tau=None):  # type: ignore[no-untyped-def]
            return measure_task(quote(candidate), quote(images), params.measure, tau=tau)

        original = measure(model)
        tau = summary.mem_tau = original.mem.threshold  # one yardstick for every candidate
        summary.mem_rule, summary.heldout_fpr = original.mem.metric, original.heldout_fpr
        summary.rows.append(_row(ORIGINAL, "-", original))

        def candidates(scorer: str, kept: list[str], **kw: object) -> None:
            kept_set = set(kept)
            removed = [i for i in all_ids if i not in kept_set]
            kept_rows = training_rows(store, params.dataset, model, kept, params.geometry)
            for config in params.mitigations:
                if config.needs_forget and not removed:
                    # Unlearning nothing leaves the model as it is: the control is the original.
                    summary.rows.append(_row(scorer, config.method, original, **kw))
                    continue
                t0 = time.perf_counter()
                forget = None
                if config.needs_forget:
                    forget = training_rows(store, params.dataset, model, removed,
                                           params.geometry)  # fmt: skip
                candidate = mitigate_task(quote(model), quote(kept_rows), config,
                                          params.progress, quote(uncond),
                                          quote(forget))  # fmt: skip
                seconds = time.perf_counter() - t0
                row = _row(scorer, config.method, measure(candidate, tau),
                           mitigate_seconds=round(seconds, 3), **kw)  # fmt: skip
                summary.rows.append(row)
                log.info("%s + %s: Mem%% %.1f, FD %.4g", scorer, config.method,
                         row.mem_percent, row.fd)  # fmt: skip

        candidates(NO_PRUNING, all_ids)
        group_of = duplicate_group_of(store, params.dataset, params.group_by)
        for spec in params.scorers:
            t0 = time.perf_counter()
            scored = score_flow(
                ScoreParams(dataset=params.dataset, model=params.model, load=params.load,
                            scorer=spec, geometry=params.geometry, workspace=ws,
                            shard_size=params.shard_size, progress=params.progress)
            )  # fmt: skip
            table = store.read("scores", columns=["sample_id", "score"],
                               where={"run_id": scored.run_id})  # fmt: skip
            flagged, removed = flag_task(quote(table.column("sample_id").to_pylist()),
                                         quote(table.column("score").to_numpy()),
                                         quote(group_of), None, params.flag)  # fmt: skip
            score_seconds = round(time.perf_counter() - t0, 3)
            removed_set = set(removed)
            candidates(spec.signal, [i for i in all_ids if i not in removed_set],
                       score_run=scored.run_id, flagged_images=len(flagged.flagged_ids),
                       removed_samples=len(removed),
                       secrets_removed=sum(s in removed_set for s in secret_ids),
                       score_seconds=score_seconds)  # fmt: skip
        summary.seconds = round(time.perf_counter() - started, 3)
    return summary
