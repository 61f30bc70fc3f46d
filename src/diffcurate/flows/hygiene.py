"""The hygiene run: scored dataset → gated, auditable candidate release waiting for approval.

Steps (each recorded in the ledger under the hygiene run's id):
    1. Score: the score flow as a subflow (resumable), or reuse a completed scoring run.
    2. Flag: rank distinct images (exact-duplicate groups collapse to their riskiest copy), take
       the top ρ% or a threshold, optionally under a per-group fairness cap, then expand each
       flagged image to all its copies (:mod:`diffcurate.curation.groups`).
    3. Audit: removal rates per group of each audited metadata attribute (fairlearn
       ``MetricFrame``), four-fifths retention ratio, chi-square/Fisher with Holm correction,
       Cramér's V; one ledger row per attribute.
    4. Mitigate: surgical fine-tune (default) or retrain on the kept samples; the candidate
       model is saved under ``WORKSPACE/models/<dataset>-hygiene-<run>/``.
    5. Gate: the released and the candidate model are sampled from the same keyed noises; Mem%
       on the secret set, FD and KID against real images; the gate policy decides; every check
       goes to the ledger and the gate table is validated with great-expectations.
    6. Release: the kept samples become a tagged candidate version ``<dataset>-candidate-<n>``
       with a manifest; ``samples`` itself is never modified. A person approves or rejects it
       (``diffcurate release approve|reject``); a failed gate or audit needs an override.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.curation.flag import FlagPolicy, FlagResult, select_removals
from diffcurate.curation.gate import GateDecision, GatePolicy, evaluate_gates
from diffcurate.curation.generations import (
    GenerationsAuditConfig,
    GenerationsAuditReport,
    audit_model_generations,
)
from diffcurate.curation.groups import GroupBy, collapse_groups
from diffcurate.curation.measure import MeasureConfig, ModelMeasurement, measure_model
from diffcurate.curation.retrigger import measure_retrigger
from diffcurate.flows.gate_inputs import (
    GateImages,
    duplicate_group_of,
    gate_images,
    metadata_frame,
    resolve_secrets,
)
from diffcurate.flows.score import ScoreParams, score_flow
from diffcurate.influence.registry import ScorerSpec
from diffcurate.metrics.audit import AuditPolicy, AuditResult
from diffcurate.metrics.audit_units import CountingUnit, UnitAudit, audit_by_unit
from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.models.diffusion import DiffusionModel, save_diffusion_model
from diffcurate.models.images import Geometry
from diffcurate.models.lance_data import LanceTrainingData
from diffcurate.models.load_options import LoadOptions
from diffcurate.models.training_data import TrainingData
from diffcurate.storage.attributes import AttributeProvenance, read_attributes
from diffcurate.storage.gate_validation import validate_gate_table
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import ReleaseInfo, create_candidate
from diffcurate.tasks.score import load_model
from diffcurate.workspace import Workspace

MAX_AUTO_GROUPS = 20
"""Metadata keys with 2..20 distinct values are audited when no attributes are named."""


class HygieneParams(BaseModel):
    """Parameters of one hygiene run (JSON-serialisable, for deployments too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Dataset to clean (as ingested).")
    model: Path = Field(
        description="Local diffusers model directory (or checkpoint file) trained on the dataset."
    )
    load: LoadOptions = Field(
        default_factory=LoadOptions,
        description="How the checkpoint is held: variant, dtype, LoRA adapters, single file.",
    )
    geometry: Geometry = Field(
        "center-crop", description="How non-square images become the model's square input."
    )
    workspace: Path = Path("workspace")
    scorer: ScorerSpec = Field(default_factory=ScorerSpec)
    score_run: str | None = Field(None, description="Reuse this completed score run.")
    flag: FlagPolicy = Field(default_factory=FlagPolicy)
    group_by: GroupBy = Field("exact", description="Duplicate groups flagged as one image.")
    fairness_attribute: str | None = Field(
        None, description="Metadata key whose groups the flag's fairness cap applies to."
    )
    audit_attributes: list[str] | None = Field(
        None, description="Metadata keys to audit; None = every key with 2-20 distinct values."
    )
    audit: AuditPolicy = Field(default_factory=AuditPolicy)
    audit_unit: CountingUnit = Field(
        "images",
        description="Count distinct images (exact-duplicate groups once) or samples in the "
        "audit; the other unit is reported beside it when the verdicts differ.",
    )
    inferred_attributes: bool = Field(
        True,
        description="Audit the attributes `diffcurate audit-attributes` inferred for the "
        "dataset (stored with their model), beside the metadata.",
    )
    generations_audit: GenerationsAuditConfig = Field(
        default_factory=GenerationsAuditConfig,
        description="Audit group shares of both models' generations (the gate checks it).",
    )
    mitigation: MitigationConfig = Field(default_factory=MitigationConfig)
    secrets: list[str] = Field(
        default_factory=list,
        description="Secret/canary sample keys or ids; empty = the flagged images themselves.",
    )
    heldout_dataset: str | None = Field(
        None, description="Real held-out images for FD/KID; None = the dataset's kept samples."
    )
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    gate: GatePolicy = Field(default_factory=GatePolicy)
    shard_size: int = Field(256, ge=1)
    progress: bool = True


class HygieneSummary(BaseModel):
    """What a hygiene run did; stored as the run's ``stats`` in the ledger."""

    run_id: str
    dataset: str
    score_run: str = ""
    n_samples: int = 0
    n_flagged_images: int = 0
    n_removed: int = 0
    n_kept: int = 0
    audit_passed: bool | None = None
    audit_violations: list[str] = Field(default_factory=list)
    audit_attributes: list[str] = Field(default_factory=list)
    audit_unit: str = Field("images", description="Counting unit that decided the audit.")
    audit_counts: dict[str, int] = Field(
        default_factory=dict, description="Distinct images and samples audited."
    )
    audit_unit_disagreements: list[str] = Field(
        default_factory=list,
        description="Attributes whose verdict differs between images and samples, and why.",
    )
    inferred_attributes: dict[str, str] = Field(
        default_factory=dict, description="Inferred attribute -> the model that inferred it."
    )
    generations_audit: dict[str, Any] | None = Field(
        None, description="The generations audit (shares before/after per group), or why not."
    )
    secrets: list[str] = Field(
        default_factory=list, description="Distinct secrets measured (one per exact group)."
    )
    secret_samples: int = Field(0, description="Samples those secrets cover, copies included.")
    secrets_source: str = ""
    reference: str = ""
    mitigation: str = ""
    candidate_model: str = ""
    before: dict[str, float] = Field(default_factory=dict)
    after: dict[str, float] = Field(default_factory=dict)
    gates: list[dict[str, Any]] = Field(default_factory=list)
    gate_passed: bool | None = None
    gate_table_errors: list[str] = Field(default_factory=list)
    gate_images: str = ""
    per_secret: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    mem_tau: float | None = Field(None, description="τ that judged both models.")
    mem_calibration: dict[str, Any] | None = Field(
        None, description="How τ was calibrated (None: fixed τ)."
    )
    mem_rule: str = Field("", description="Reconstruction metric that judged both models.")
    heldout_fpr: dict[str, float | None] = Field(
        default_factory=dict,
        description="Share of held-out (reference) images the rule counts as reconstructed.",
    )
    guidance_scale: float | None = None
    retrigger: dict[str, Any] | None = Field(
        None,
        description="Re-trigger probe (perturbed caption embeddings): before/after results with "
        "per-secret details, or why it was skipped; None when the probe was off.",
    )
    geometry: dict[str, Any] = Field(
        default_factory=dict, description="Images cropped / upscaled / padded to fit the model."
    )
    geometry_warning: str | None = None
    release_tag: str = ""
    seconds: float = 0.0
    stage_seconds: dict[str, float] = Field(
        default_factory=dict, description="Wall time of each stage (score, flag, audit, ...)."
    )


# ------------------------------------------------------------------------------------ tasks
@task(name="flag", cache_policy=NO_CACHE)
def flag_task(
    ids: list[str],
    scores: np.ndarray,
    group_of: dict[str, str],
    fairness_groups: dict[str, str] | None,
    policy: FlagPolicy,
) -> tuple[FlagResult, list[str]]:
    """Select distinct images to remove and expand them to every copy."""
    collapsed = collapse_groups(ids, scores, group_of)
    groups = None
    if fairness_groups is not None:
        groups = [fairness_groups.get(r) for r in collapsed.representatives]
    result = select_removals(
        collapsed.representatives, collapsed.scores, policy=policy, groups=groups
    )
    return result, collapsed.expand(result.flagged_ids)


@task(name="audit", cache_policy=NO_CACHE)
def audit_task(
    frame: pd.DataFrame,
    attributes: list[str],
    policy: AuditPolicy,
    image_of: dict[str, str] | None = None,
    unit: CountingUnit = "images",
) -> UnitAudit:
    """Audit the removal set counted on distinct images and on samples; ``unit`` decides."""
    return audit_by_unit(frame, attributes, image_of or {}, unit=unit, removed="removed",
                         policy=policy)  # fmt: skip


@task(name="audit-generations", cache_policy=NO_CACHE)
def generations_audit_task(
    before: DiffusionModel,
    after: DiffusionModel,
    config: GenerationsAuditConfig,
    measure: MeasureConfig,
    captions: list[str],
) -> GenerationsAuditReport:
    """Sample both models from the same keyed noises and prompts; compare group shares."""
    return audit_model_generations(before, after, config, measure, captions)


@task(name="mitigate", cache_policy=NO_CACHE)
def mitigate_task(
    model: DiffusionModel,
    kept: TrainingData,
    config: MitigationConfig,
    progress: bool,
    unconditional: torch.Tensor | None = None,
    removed: TrainingData | None = None,
) -> DiffusionModel:
    """The candidate from the kept samples (and the removed ones, for unlearning methods)."""
    candidate, _ = mitigate(model, kept, config, progress=progress, unconditional=unconditional,
                            removed_images=removed)  # fmt: skip
    return candidate


@task(name="measure", cache_policy=NO_CACHE)
def measure_task(
    model: DiffusionModel,
    images: GateImages,
    config: MeasureConfig,
    save_closest_to: Path | None = None,
    tau: float | None = None,
) -> ModelMeasurement:
    """Measure ``model`` on the gate's images; the reference images also calibrate τ (when
    ``config.calibrate_fpr`` is set) and give the held-out false-positive rate. With
    ``config.retrigger.enabled`` the re-trigger probe runs too, judged by the same rule and τ."""
    measured = measure_model(
        model, images.secrets, images.secret_ids, images.reference, config, images.secret_cond,
        images.reference_cond, save_closest_to, tau=tau, calibration_images=images.reference,
        calibration_conditioning=images.reference_cond, unconditional=images.unconditional,
        neighbours=images.neighbours,
    )  # fmt: skip
    if not config.retrigger.enabled:
        return measured
    policy = config.policy_for(model).model_copy(update={"threshold": measured.mem.threshold})
    probed = measure_retrigger(
        model, images.secrets, images.secret_ids, images.secret_cond, config, policy,
        unconditional=images.unconditional, neighbours=images.neighbours,
    )  # fmt: skip
    return measured.model_copy(update={"retrigger": probed})


# ---------------------------------------------------------------------------------- helpers
def auto_attributes(frame: pd.DataFrame) -> list[str]:
    """Metadata columns that look like group attributes (2..MAX_AUTO_GROUPS distinct values)."""
    skip = {"sample_id", "key", "caption", "removed"}
    out = []
    for col in frame.columns:
        if col in skip:
            continue
        distinct = frame[col].dropna().astype(str).nunique()
        if 2 <= distinct <= MAX_AUTO_GROUPS:
            out.append(col)
    return out


def with_inferred(
    frame: pd.DataFrame, inferred: pd.DataFrame, provenance: dict[str, AttributeProvenance]
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The metadata frame with the inferred attributes as columns, and column -> provenance.

    An inferred attribute whose name is also a metadata key is added as ``inferred_<name>``,
    so a metadata column is never silently replaced by a model's guess.
    """
    described: dict[str, str] = {}
    rename = {}
    for name, prov in provenance.items():
        column = f"inferred_{name}" if name in frame.columns else name
        rename[name] = column
        described[column] = prov.describe()
    merged = frame.merge(inferred.rename(columns=rename), on="sample_id", how="left")
    return merged, described


def audit_ledger_summary(audit: UnitAudit, index: int, inferred_by: str | None) -> dict[str, Any]:
    """One attribute's ledger summary: the deciding unit's statistics, the other unit's, and
    the provenance of an inferred attribute."""
    a, other = audit.result.attributes[index], audit.other.attributes[index]
    why = next((c.explanation for c in audit.comparisons if c.attribute == a.attribute), None)
    n_units = audit.n_images if audit.unit == "images" else audit.n_samples
    return {
        **a.model_dump(mode="json", exclude={"groups"}), "unit": audit.unit, "n_units": n_units,
        "n_images": audit.n_images, "n_samples": audit.n_samples,
        "units_disagree": a.attribute in audit.disagree, "unit_explanation": why,
        "other_unit": {"unit": audit.other_unit,
                       **other.model_dump(mode="json", exclude={"groups", "notes"}),
                       "groups": {g.group: g.model_dump(mode="json") for g in other.groups}},
        "inferred_by": inferred_by,
    }  # fmt: skip


def generations_stats(report: GenerationsAuditReport | None, why: str | None) -> dict[str, Any]:
    """The generations audit for the summary and the dashboard."""
    if report is None or report.result is None:
        skipped = [] if report is None else report.skipped
        return {"result": None, "why": why or "; ".join(skipped) or "nothing to infer"}
    return {"result": report.result.model_dump(mode="json"), "inferred_by": report.inferred_by,
            "generations": report.generations, "prompts": report.prompts,
            "skipped": report.skipped}  # fmt: skip


def _measurement_stats(m: ModelMeasurement) -> dict[str, float]:
    stats = {"mem_percent": m.mem.mem_percent, "fd": m.fd, "kid": m.kid.mean,
             "kid_std": m.kid.std}  # fmt: skip
    if m.retrigger is not None and m.retrigger.mem_percent is not None:
        stats["retrigger_mem_percent"] = m.retrigger.mem_percent
    return stats


def retrigger_stats(before: ModelMeasurement, after: ModelMeasurement) -> dict[str, Any] | None:
    """The re-trigger probe's results for the summary and the dashboard (None: probe off)."""
    b, a = before.retrigger, after.retrigger
    last = a if a is not None else b
    if last is None:
        return None
    per_secret: dict[str, dict[str, Any]] = {}
    for phase, result in (("before", b), ("after", a)):
        for s in [] if result is None else result.secrets:
            per_secret.setdefault(s.secret_id, {})[phase] = s.model_dump(mode="json")
    return {
        "skipped": last.skipped,
        "mem_percent": {"before": None if b is None else b.mem_percent,
                        "after": None if a is None else a.mem_percent},
        "seconds": {"before": None if b is None else b.seconds,
                    "after": None if a is None else a.seconds},
        "probes": last.probes,
        "per_secret": per_secret,
    }  # fmt: skip


def training_rows(
    store: LanceStore, dataset: str, model: DiffusionModel, ids: list[str], geometry: Geometry
) -> LanceTrainingData:
    """The rows ``model`` trains on for ``ids``, read from LanceDB one batch at a time (so a
    run's memory does not grow with the corpus), latents filled into the cache first."""
    return LanceTrainingData(store, dataset, model, ids, geometry=geometry)


def needs_neighbours(config: MeasureConfig, model: DiffusionModel) -> bool:
    """Whether the rule in force for ``model`` compares with the nearest training images."""
    return config.policy_for(model).relative


class _StageClock:
    """Wall time per stage, so a slow run says where its time went."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = round(now - self.mark, 3)
        self.mark = now


# ------------------------------------------------------------------------------------- flow
@flow(name="hygiene", validate_parameters=True)
def hygiene_flow(params: HygieneParams) -> HygieneSummary:
    """Score → flag → audit → mitigate → gate → candidate release."""
    log = get_run_logger()
    started = time.perf_counter()
    ws = params.workspace
    layout = Workspace(ws)
    store = LanceStore.open(layout)
    ledger = Ledger(layout.ledger_path)
    if not params.model.exists():
        raise FileNotFoundError(f"model not found: {params.model}")
    with ledger.recording("hygiene", dataset=params.dataset, source=str(params.model),
                          params=params.model_dump(mode="json")) as run:  # fmt: skip
        run_id = run.run_id
        summary = HygieneSummary(run_id=run_id, dataset=params.dataset)
        run.stats = lambda: summary.model_dump(mode="json")
        clock = _StageClock(summary.stage_seconds)
        # 1. Score.
        if params.score_run is None:
            scored = score_flow(
                ScoreParams(dataset=params.dataset, model=params.model, load=params.load,
                            scorer=params.scorer, geometry=params.geometry, workspace=ws,
                            shard_size=params.shard_size, progress=params.progress)
            )  # fmt: skip
            summary.score_run = scored.run_id
        else:
            prior = ledger.run(params.score_run)
            if prior.kind != "score" or prior.status != "completed":
                raise ValueError(f"{params.score_run} is not a completed score run")
            if prior.dataset != params.dataset:
                raise ValueError(f"{params.score_run} scored {prior.dataset!r}, not "
                                 f"{params.dataset!r}")  # fmt: skip
            summary.score_run = params.score_run
        scores = store.read("scores", columns=["sample_id", "score"],
                            where={"run_id": summary.score_run})  # fmt: skip
        ids = scores.column("sample_id").to_pylist()
        values = scores.column("score").to_numpy()
        samples = store.read("samples", params.dataset,
                             columns=["sample_id", "key", "caption", "metadata"])  # fmt: skip
        frame = metadata_frame(samples.to_pylist())
        if set(ids) != set(frame["sample_id"]):
            raise ValueError(f"score run {summary.score_run} does not cover exactly the samples "
                             f"of {params.dataset!r}: re-score the dataset")  # fmt: skip
        summary.n_samples = len(ids)
        clock.lap("score")

        # 2. Flag.
        fairness = None
        if params.fairness_attribute is not None:
            if params.fairness_attribute not in frame.columns:
                raise ValueError(f"no metadata attribute {params.fairness_attribute!r}")
            fairness = dict(zip(frame["sample_id"], frame[params.fairness_attribute].astype(str),
                                strict=True))  # fmt: skip
        group_of = duplicate_group_of(store, params.dataset, params.group_by)
        flagged, removed = flag_task(quote(ids), quote(values), quote(group_of), quote(fairness),
                                     params.flag)  # fmt: skip
        removed_set = set(removed)
        kept = [i for i in frame["sample_id"] if i not in removed_set]
        summary.n_flagged_images = len(flagged.flagged_ids)
        summary.n_removed, summary.n_kept = len(removed), len(kept)
        log.info("flagged %d images (%d samples)", len(flagged.flagged_ids), len(removed))
        clock.lap("flag")

        # 3. Audit, on metadata and inferred attributes, counted on distinct images by default.
        frame["removed"] = frame["sample_id"].isin(removed_set)
        audit_frame, inferred_by = frame, {}
        if params.inferred_attributes:
            audit_frame, inferred_by = with_inferred(frame, *read_attributes(store, params.dataset))
        summary.inferred_attributes = inferred_by
        attributes = params.audit_attributes or auto_attributes(audit_frame)
        missing = [a for a in attributes if a not in audit_frame.columns]
        if missing:
            raise ValueError(f"audit attributes not in the metadata or the inferred "
                             f"attributes: {missing}")  # fmt: skip
        summary.audit_attributes = attributes
        audit: AuditResult | None = None
        if attributes:
            exact = duplicate_group_of(store, params.dataset, "exact")
            by_unit = audit_task(quote(audit_frame), attributes, params.audit, quote(exact),
                                 params.audit_unit)  # fmt: skip
            audit = by_unit.result
            for i, a in enumerate(audit.attributes):
                ledger.record_audit(
                    run_id, dataset=params.dataset, attribute=a.attribute,
                    groups={g.group: g.model_dump(mode="json") for g in a.groups},
                    passed=not (a.ratio_violation or a.dependence_violation),
                    summary=audit_ledger_summary(by_unit, i, inferred_by.get(a.attribute)),
                )  # fmt: skip
            summary.audit_passed, summary.audit_violations = audit.passed, audit.violations
            summary.audit_unit = by_unit.unit
            summary.audit_counts = {"images": by_unit.n_images, "samples": by_unit.n_samples}
            summary.audit_unit_disagreements = [c.explanation for c in by_unit.comparisons]
        clock.lap("audit")

        # 4. Mitigate, on what the model consumes, streamed from LanceDB a batch at a time
        # (VAE latents are cached across runs).
        model = load_model(params.model, options=params.load)
        kept_rows = training_rows(store, params.dataset, model, kept, params.geometry)
        summary.geometry = kept_rows.geometry.model_dump(mode="json")
        summary.geometry_warning = kept_rows.geometry.warning()
        if summary.geometry_warning:
            log.warning("%s", summary.geometry_warning)
        uncond = model.text_encoder.encode([""]) if model.text_encoder is not None else None
        forget = None
        if params.mitigation.needs_forget:  # unlearning methods also see the removed samples
            forget = training_rows(store, params.dataset, model, removed, params.geometry)
        candidate = mitigate_task(
            quote(model), quote(kept_rows), params.mitigation, params.progress, quote(uncond),
            quote(forget),
        )  # fmt: skip
        out_dir = layout.hygiene_model_dir(params.dataset, run_id)
        save_diffusion_model(candidate, out_dir)
        summary.mitigation = (
            f"{params.mitigation.method}: {params.mitigation.steps_for(len(kept))} steps"
        )
        summary.candidate_model = str(out_dir)
        clock.lap("mitigate")

        # 5. Gate: distinct secrets, generated for once each.
        secret_ids, summary.secrets_source = resolve_secrets(
            params.secrets, frame, flagged.flagged_ids
        )
        if not secret_ids:
            raise ValueError("no secret images: configure secrets or flag at least one image")
        images = gate_images(
            store, params.dataset, model, frame, secret_ids, training_ids=kept,
            heldout_dataset=params.heldout_dataset, seed=params.measure.seed,
            geometry=params.geometry, with_neighbours=needs_neighbours(params.measure, model),
            what="kept training images",
        )  # fmt: skip
        summary.secrets, summary.secret_samples = images.secret_ids, images.n_secret_samples
        summary.reference = images.reference_described
        gate_dir = layout.gate_dir(run_id)
        before = measure_task(quote(model), quote(images), params.measure, gate_dir / "before")
        # One yardstick: a τ calibrated on the model before mitigation also judges the candidate.
        summary.mem_tau, summary.mem_rule = before.mem.threshold, before.mem.metric
        summary.guidance_scale = before.guidance_scale
        if before.calibration is not None:
            summary.mem_calibration = {**before.calibration.model_dump(mode="json"),
                                       "images": summary.reference}  # fmt: skip
        clock.lap("measure before")
        after = measure_task(quote(candidate), quote(images), params.measure, gate_dir / "after",
                             tau=before.mem.threshold)  # fmt: skip
        summary.heldout_fpr = {"before": before.heldout_fpr, "after": after.heldout_fpr}
        clock.lap("measure after")
        summary.gate_images = str(gate_dir)
        summary.before, summary.after = _measurement_stats(before), _measurement_stats(after)
        summary.retrigger = retrigger_stats(before, after)
        summary.per_secret = {
            b.secret_id: {"before": b.best_value, "after": a.best_value}
            for b, a in zip(before.mem.secrets, after.mem.secrets, strict=True)
        }
        gen_report, gen_why = None, None
        if params.generations_audit.enabled:
            try:
                gen_report = generations_audit_task(
                    quote(model), quote(candidate), params.generations_audit, params.measure,
                    quote(frame["caption"].fillna("").tolist()),
                )  # fmt: skip
            except (ValueError, RuntimeError, OSError) as e:  # fails closed at the gate
                gen_why = f"not measured: {e}"
                log.warning("generations audit %s", gen_why)
            summary.generations_audit = generations_stats(gen_report, gen_why)
            clock.lap("audit generations")
        decision: GateDecision = evaluate_gates(
            params.gate, mem_before=before.mem, mem_after=after.mem, fd_before=before.fd,
            fd_after=after.fd, audit=audit if audit is not None else True,
            kid_before=before.kid, kid_after=after.kid, retrigger_before=before.retrigger,
            retrigger_after=after.retrigger, retrigger_probed=params.measure.retrigger.enabled,
            generations_audit=None if gen_report is None else gen_report.result,
            generations_audited=params.generations_audit.enabled,
        )  # fmt: skip
        inputs = {"secrets": secret_ids, "secrets_source": summary.secrets_source,
                  "reference": summary.reference, "measure": params.measure.model_dump(mode="json"),
                  "candidate_model": summary.candidate_model,
                  "score_run": summary.score_run, "mem_tau": summary.mem_tau,
                  "mem_calibration": summary.mem_calibration, "mem_rule": summary.mem_rule,
                  "heldout_fpr": summary.heldout_fpr, "guidance_scale": summary.guidance_scale,
                  "model_source": model.source}  # fmt: skip
        gate_rows = [c.model_dump(mode="json") for c in decision.checks]
        summary.gate_table_errors = validate_gate_table(
            pd.DataFrame([{**c, "policy_version": params.gate.version} for c in gate_rows])
        )
        for c in decision.checks:
            ledger.record_gate_check(
                run_id, name=c.name, passed=c.passed, policy_version=params.gate.version,
                value_before=c.value_before, value_after=c.value_after, threshold=c.threshold,
                inputs={**inputs, "reason": c.reason},
            )  # fmt: skip
        summary.gates = gate_rows
        summary.gate_passed = decision.passed and not summary.gate_table_errors
        clock.lap("gate")

        # 6. Candidate release.
        release: ReleaseInfo = create_candidate(
            store, ledger, params.dataset, kept, removed,
            manifest={
                "runs": {"hygiene": run_id, "score": summary.score_run},
                "audit": None if audit is None else {"passed": audit.passed,
                                                     "violations": audit.violations},
                "gates": gate_rows, "gate_passed": summary.gate_passed,
                "gate_policy": params.gate.model_dump(mode="json"),
                "candidate_model": summary.candidate_model,
            },
        )  # fmt: skip
        summary.release_tag = release.tag
        clock.lap("release")
        summary.seconds = round(time.perf_counter() - started, 3)
    return summary
