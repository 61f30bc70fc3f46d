"""``diffcurate run`` (a hygiene run) and ``diffcurate eval`` (scorers compared on your data),
which share the flag, mitigation and gate-measurement options."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from diffcurate.cli.checks import check_datasets, check_model
from diffcurate.cli.common import (
    GeometryOpt,
    LoadDTypeOpt,
    LoraOpt,
    LoraScaleOpt,
    ModelConfigOpt,
    ThreadsOpt,
    VariantOpt,
    WorkspaceOpt,
    err,
    fail,
    load_options,
    out,
    preflight,
    safe,
    secret_list,
    workspace_settings,
)
from diffcurate.cli.scorer_options import OptionOpt, parse_options

if TYPE_CHECKING:
    from diffcurate.mitigation import MitigationConfig

# Options that `run` and `eval` share.
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Flag images scoring at least this (instead of top).")
]
GroupByOpt = Annotated[
    str, typer.Option(help="Duplicate groups flagged as one image: exact | near | none.")
]
EpochsOpt = Annotated[
    int | None,
    typer.Option(help="Fine-tune methods: passes over the kept samples (when --steps is unset)."),
]
StepsOpt = Annotated[
    int | None,
    typer.Option("--steps", help="Fine-tune methods: optimiser steps [default: the measured 64]."),
]
LrOpt = Annotated[
    float | None,
    typer.Option(
        help="Fine-tune methods: learning rate [default: 1e-3, the reference models' training "
        "rate; pass your model's own]."
    ),
]
RetrainStepsOpt = Annotated[int, typer.Option(help="Steps when retraining.")]
MitigationOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--mitigation-option",
        help="Any other mitigation setting as KEY=VALUE (repeatable), e.g. forget_weight=0.5, "
        "warmup_steps=10, caption_noise=0.1, caption_replace=0.1, layer_coverage=0.5 (README, "
        "'Mitigation').",
    ),
]
MitigationSeedOpt = Annotated[int, typer.Option(help="Seed of scoring, mitigation and sampling.")]

GuidanceOpt = Annotated[
    float, typer.Option(help="Classifier-free guidance of the gate's generations (T2I models).")
]
PerSecretOpt = Annotated[
    int, typer.Option(help="T2I models: generations per distinct secret, from its caption.")
]
GateStepsOpt = Annotated[int, typer.Option(help="DDIM steps of the gate's generations.")]
MemRuleOpt = Annotated[
    str,
    typer.Option(
        help="Reconstruction rule: auto (relative for latent models, absolute otherwise) | "
        "absolute (tiled L2 < tau) | relative (Carlini et al.'s distance ratio to the "
        "nearest training images < tau)."
    ),
]
RetriggerOpt = Annotated[
    bool,
    typer.Option(
        "--retrigger/--no-retrigger",
        help="T2I models: also measure re-trigger Mem% (Finding Dori): each secret's caption "
        "embedding perturbed at random and by a few gradient steps towards the secret "
        "(not applicable to unconditional models).",
    ),
]
RetriggerProbesOpt = Annotated[
    int, typer.Option(help="Re-trigger probe: random perturbations per secret.")
]
RetriggerSigmaOpt = Annotated[
    float, typer.Option(help="Re-trigger probe: random perturbation radius, relative to ||e||.")
]
RetriggerStepsOpt = Annotated[
    int, typer.Option(help="Re-trigger probe: gradient steps towards the secret (0: none).")
]
RetriggerLrOpt = Annotated[
    float, typer.Option(help="Re-trigger probe: step length, relative to ||e||.")
]
RetriggerRhoOpt = Annotated[
    float, typer.Option(help="Re-trigger probe: radius of the optimised perturbation vs ||e||.")
]
RetriggerGensOpt = Annotated[
    int, typer.Option(help="Re-trigger probe: generations from each probed embedding.")
]


def mitigation_config(
    method: str | None,
    epochs: int | None,
    steps: int | None,
    lr: float | None,
    retrain_steps: int,
    options: list[str] | None,
    seed: int,
    device: str,
) -> MitigationConfig:
    """The mitigation settings of ``run``/``eval``: what was given, the measured defaults for
    the rest (:class:`~diffcurate.mitigation.MitigationConfig`)."""
    from diffcurate.mitigation import MitigationConfig

    values: dict[str, object] = {"retrain_steps": retrain_steps, "seed": seed, "device": device}
    given = {"method": method, "epochs": epochs, "steps": steps, "lr": lr}
    values |= {k: v for k, v in given.items() if v is not None}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--mitigation-option takes KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = value.strip()
    return MitigationConfig(**values)


def run_hygiene(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to clean.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    scorer: Annotated[
        str, typer.Option("--scorer", "-s", help="Risk signal (see `diffcurate score`).")
    ] = "divergence",
    option: OptionOpt = None,
    score_run: Annotated[
        str | None, typer.Option(help="Reuse this completed score run instead of scoring.")
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="Flag the top fraction of distinct images (0.01 = 1%).")
    ] = 0.01,
    threshold: ThresholdOpt = None,
    group_by: GroupByOpt = "exact",
    fairness_attribute: Annotated[
        str | None, typer.Option(help="Metadata key whose groups the fairness cap applies to.")
    ] = None,
    fairness_cap: Annotated[
        float | None,
        typer.Option(help="Max per-group removal rate as a multiple of the corpus rate."),
    ] = None,
    audit_attribute: Annotated[
        list[str] | None,
        typer.Option(
            help="Metadata key or inferred attribute to audit (repeatable) [default: every "
            "key with 2-20 distinct values, inferred attributes included]."
        ),
    ] = None,
    audit_unit: Annotated[
        str,
        typer.Option(
            help="Count the audit on distinct images (exact-duplicate groups once) or "
            "samples: images | samples (the other unit is shown when the verdicts differ)."
        ),
    ] = "images",
    inferred: Annotated[
        bool,
        typer.Option(
            "--inferred/--no-inferred",
            help="Audit the attributes `diffcurate audit-attributes` stored for the dataset.",
        ),
    ] = True,
    audit_generations: Annotated[
        int,
        typer.Option(
            help="Generations per model for the generations audit (group shares before vs "
            "after, on the image-based inferred attributes); 0 turns it off."
        ),
    ] = 256,
    min_generation_share: Annotated[
        float,
        typer.Option(
            help="Gate: smallest share after / share before of any group in the generations."
        ),
    ] = 0.5,
    mitigation: Annotated[
        str | None,
        typer.Option(
            help="erasediff | finetune | layer-finetune | gradient-ascent | retrain [default: "
            "the method measured best, README 'Mitigation']."
        ),
    ] = None,
    epochs: EpochsOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    retrain_steps: RetrainStepsOpt = 3000,
    mitigation_option: MitigationOptionOpt = None,
    secrets: Annotated[
        str | None,
        typer.Option(
            help="Secret/canary images: a JSON file (list, or object with "
            "`planted_keys`) or comma-separated keys/ids [default: the flagged images]."
        ),
    ] = None,
    heldout_dataset: Annotated[
        str | None, typer.Option(help="Ingested held-out real images for FD/KID.")
    ] = None,
    generations: Annotated[int, typer.Option(help="Samples per model for the gates.")] = 256,
    mem_tau: Annotated[
        float | None,
        typer.Option(
            help="Fixed threshold of the reconstruction rule: τ on tiled L2 of [0, 1] pixels "
            "(absolute), δ on the distance ratio (relative) [default: 0.08 / 0.8, or "
            "calibrated with --mem-calibrate-fpr]."
        ),
    ] = None,
    mem_calibrate_fpr: Annotated[
        float | None,
        typer.Option(
            help="Calibrate τ so that at most this share of the utility reference "
            "images (held-out where given) count as reconstructed by the model "
            "before mitigation; that τ judges both models."
        ),
    ] = None,
    max_mem: Annotated[float, typer.Option(help="Gate: max Mem% after mitigation.")] = 10.0,
    max_fd_increase: Annotated[
        float, typer.Option(help="Gate: max relative FD increase (0.10 = 10%).")
    ] = 0.10,
    mem_rule: MemRuleOpt = "auto",
    guidance_scale: GuidanceOpt = 7.5,
    generations_per_secret: PerSecretOpt = 8,
    inference_steps: GateStepsOpt = 50,
    retrigger: RetriggerOpt = True,
    retrigger_probes: RetriggerProbesOpt = 4,
    retrigger_sigma: RetriggerSigmaOpt = 0.05,
    retrigger_steps: RetriggerStepsOpt = 10,
    retrigger_lr: RetriggerLrOpt = 0.02,
    retrigger_rho: RetriggerRhoOpt = 0.1,
    retrigger_generations: RetriggerGensOpt = 1,
    max_retrigger_mem: Annotated[
        float | None,
        typer.Option(
            help="Gate: max re-trigger Mem% after mitigation [default: recorded, not blocking]."
        ),
    ] = None,
    seed: MitigationSeedOpt = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    variant: VariantOpt = None,
    dtype: LoadDTypeOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run a hygiene run: score → flag → audit → mitigate → gate → candidate release.

    Flags the riskiest distinct images (every copy of a flagged image is removed), audits the
    removal set for group skew, produces a candidate model on the kept samples, measures Mem%
    on the secret images and FD/KID before vs after, and tags the kept samples as
    `<dataset>-candidate-<n>`. Nothing is approved automatically: `diffcurate release approve`
    does that (a failed gate or audit needs `--override`). Exit code 0 when the gates pass,
    1 when the candidate was created but failed a gate, 2 when refused.

    Latent text-to-image pipelines (VAE + text encoder + cross-attention UNet) are mitigated on
    cached VAE latents with their captions, and gated by prompting each distinct secret's
    caption under classifier-free guidance; `--mem-rule auto` then judges reconstructions by
    Carlini et al.'s relative distance, which a VAE's blur does not hide.
    """
    settings = workspace_settings(workspace, threads, existing=True)
    check_model(model, config=model_config, lora=lora, variant=variant)
    check_datasets(settings, dataset, heldout_dataset)
    try:
        from diffcurate.curation.flag import FlagPolicy
        from diffcurate.curation.gate import GatePolicy
        from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
        from diffcurate.influence.registry import ScorerSpec

        load = load_options(variant, dtype, lora, lora_scale, model_config, device)
        measure = _measure_config(
            generations, seed, device, mem_tau, mem_calibrate_fpr, mem_rule, guidance_scale,
            generations_per_secret, inference_steps,
            _retrigger_config(retrigger, retrigger_probes, retrigger_sigma, retrigger_steps,
                              retrigger_lr, retrigger_rho, retrigger_generations, seed),
        )  # fmt: skip
        flag = (
            FlagPolicy(mode="threshold", threshold=threshold, fairness_cap=fairness_cap)
            if threshold is not None
            else FlagPolicy(fraction=fraction, fairness_cap=fairness_cap)
        )
        params = HygieneParams(
            dataset=dataset, model=model, load=load, geometry=geometry,
            workspace=settings.workspace,
            scorer=ScorerSpec.from_settings(
                scorer, {"seed": seed, "device": device} | parse_options(option, [scorer])[scorer]
            ),
            score_run=score_run,
            flag=flag, group_by=group_by, fairness_attribute=fairness_attribute,
            audit_attributes=audit_attribute or None, audit_unit=audit_unit,
            inferred_attributes=inferred,
            generations_audit=_generations_audit(settings, audit_generations,
                                                 min_generation_share),
            mitigation=mitigation_config(mitigation, epochs, steps, lr, retrain_steps,
                                        mitigation_option, seed, device),
            secrets=secret_list(secrets), heldout_dataset=heldout_dataset, measure=measure,
            gate=GatePolicy(max_mem_percent_after=max_mem,
                            max_relative_fd_increase=max_fd_increase,
                            max_retrigger_mem_percent_after=max_retrigger_mem),
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise fail(str(e)) from e
    preflight(model, load, device)
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.storage.releases import ReleaseError

    try:
        summary = hygiene_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError, ReleaseError) as e:
        raise fail(str(e)) from e
    _print_hygiene(summary)
    if not summary.gate_passed:
        raise typer.Exit(1)


def evaluate(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset the model saw.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    secrets: Annotated[
        str,
        typer.Option(
            help="Secret/canary images whose memorization is measured: a JSON file (list, or "
            "object with `planted_keys`) or comma-separated keys/ids."
        ),
    ],
    scorers: Annotated[
        str, typer.Option(help="Comma-separated risk scorers to compare (see `score`).")
    ] = "divergence,loss,trace,random",
    option: OptionOpt = None,
    fraction: Annotated[
        float, typer.Option(help="Budget: the top fraction of distinct images, for every scorer.")
    ] = 0.01,
    threshold: ThresholdOpt = None,
    group_by: GroupByOpt = "exact",
    mitigation: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated mitigations to compare (erasediff, finetune, layer-finetune, "
            "gradient-ascent, retrain) [default: the method measured best]."
        ),
    ] = None,
    epochs: EpochsOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    retrain_steps: RetrainStepsOpt = 3000,
    mitigation_option: MitigationOptionOpt = None,
    heldout_dataset: Annotated[
        str | None, typer.Option(help="Ingested held-out real images for FD/KID and τ.")
    ] = None,
    generations: Annotated[int, typer.Option(help="Samples per model.")] = 256,
    mem_tau: Annotated[
        float | None, typer.Option(help="Fixed reconstruction threshold τ [default: 0.08].")
    ] = None,
    mem_calibrate_fpr: Annotated[
        float | None,
        typer.Option(help="Calibrate τ on the original model to this false-positive rate."),
    ] = None,
    mem_rule: MemRuleOpt = "auto",
    guidance_scale: GuidanceOpt = 7.5,
    generations_per_secret: PerSecretOpt = 8,
    inference_steps: GateStepsOpt = 50,
    retrigger: RetriggerOpt = True,
    retrigger_probes: RetriggerProbesOpt = 4,
    retrigger_sigma: RetriggerSigmaOpt = 0.05,
    retrigger_steps: RetriggerStepsOpt = 10,
    retrigger_lr: RetriggerLrOpt = 0.02,
    retrigger_rho: RetriggerRhoOpt = 0.1,
    retrigger_generations: RetriggerGensOpt = 1,
    seed: MitigationSeedOpt = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    variant: VariantOpt = None,
    dtype: LoadDTypeOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Compare risk scorers on your dataset, model and secrets: prune, mitigate, measure.

    For each scorer: score the dataset (resumable), flag the same budget, mitigate, and measure
    Mem% of the secrets (one τ for every model) and FD/KID. Controls: the original model, and
    each mitigation on every sample (no pruning). Nothing is released; the table goes to the
    ledger as an `eval` run. Cost: one scoring run per scorer plus one mitigation and one
    measurement per scorer x mitigation.
    """
    settings = workspace_settings(workspace, threads, existing=True)
    check_model(model, config=model_config, lora=lora, variant=variant)
    check_datasets(settings, dataset, heldout_dataset)
    try:
        from diffcurate.curation.flag import FlagPolicy
        from diffcurate.flows.evaluate import EvalParams
        from diffcurate.influence.registry import ScorerSpec

        load = load_options(variant, dtype, lora, lora_scale, model_config, device)
        measure = _measure_config(
            generations, seed, device, mem_tau, mem_calibrate_fpr, mem_rule, guidance_scale,
            generations_per_secret, inference_steps,
            _retrigger_config(retrigger, retrigger_probes, retrigger_sigma, retrigger_steps,
                              retrigger_lr, retrigger_rho, retrigger_generations, seed),
        )  # fmt: skip
        names = list(dict.fromkeys(s.strip() for s in scorers.split(",") if s.strip()))
        flag = (
            FlagPolicy(mode="threshold", threshold=threshold)
            if threshold is not None
            else FlagPolicy(fraction=fraction)
        )
        params = EvalParams(
            dataset=dataset, model=model, load=load, geometry=geometry,
            workspace=settings.workspace,
            secrets=secret_list(secrets),
            scorers=[ScorerSpec.from_settings(s, {"seed": seed, "device": device} | opts)
                     for s, opts in parse_options(option, names).items()],
            flag=flag, group_by=group_by,
            mitigations=[mitigation_config(m, epochs, steps, lr, retrain_steps,
                                           mitigation_option, seed, device)
                         for m in ([m.strip() for m in mitigation.split(",") if m.strip()]
                                   if mitigation else [None])],
            heldout_dataset=heldout_dataset, measure=measure,
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise fail(str(e)) from e
    preflight(model, load, device)
    from diffcurate.flows.evaluate import NO_PRUNING, ORIGINAL, eval_flow
    from diffcurate.models.diffusion import ModelLoadError

    try:
        summary = eval_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError) as e:
        raise fail(str(e)) from e
    title = (f"eval {summary.run_id}: {len(summary.secrets)} secrets, τ "
             f"{summary.mem_tau:.4g}; FD/KID reference: {summary.reference}")  # fmt: skip
    t = Table(title=safe(title))
    t.add_column("scorer", no_wrap=True)
    t.add_column("mitigation", no_wrap=True)
    probed = any(r.retrigger_mem_percent is not None for r in summary.rows)
    for name in ("removed images/samples", "secrets removed", "Mem%",
                 *(["re-trigger Mem%"] if probed else []), "FD (vs none)", "KID",
                 "score s"):  # fmt: skip
        t.add_column(name, justify="right")
    control = {r.mitigation: r for r in summary.rows if r.scorer == NO_PRUNING}
    for r in summary.rows:
        base = control.get(r.mitigation)
        rel = "" if base is None or r is base else f" ({100 * (r.fd - base.fd) / base.fd:+.1f}%)"
        pruned = r.scorer not in (NO_PRUNING, ORIGINAL)
        t.add_row(r.scorer, r.mitigation,
                  f"{r.flagged_images}/{r.removed_samples}" if pruned else "",
                  f"{r.secrets_removed}/{len(summary.secrets)}" if pruned else "",
                  f"{r.mem_percent:.1f}",
                  *([_pct(r.retrigger_mem_percent)] if probed else []),
                  f"{r.fd:.4g}{rel}", f"{r.kid:.4g}",
                  f"{r.score_seconds:.1f}" if pruned else "")  # fmt: skip
    out.print(t)
    out.print("controls: 'original' = the model as given; 'none' = the mitigation on every "
              "sample (no pruning): compare each scorer's row with the 'none' row of its "
              "mitigation.")  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _measure_config(
    generations: int,
    seed: int,
    device: str,
    mem_tau: float | None,
    mem_calibrate_fpr: float | None,
    mem_rule: str,
    guidance_scale: float,
    generations_per_secret: int,
    inference_steps: int,
    retrigger=None,  # RetriggerConfig | None (imported lazily)
):  # -> MeasureConfig (imported lazily)
    """The gate's measurement settings, shared by `run` and `eval`."""
    from diffcurate.curation.measure import MeasureConfig
    from diffcurate.metrics.memorization import MemorizationPolicy

    if mem_tau is not None and mem_calibrate_fpr is not None:
        raise ValueError("give either --mem-tau or --mem-calibrate-fpr, not both")
    return MeasureConfig(
        generations=generations, seed=seed, device=device, rule=mem_rule,
        memorization=MemorizationPolicy(threshold=mem_tau), calibrate_fpr=mem_calibrate_fpr,
        guidance_scale=guidance_scale, generations_per_secret=generations_per_secret,
        inference_steps=inference_steps, **({} if retrigger is None else {"retrigger": retrigger}),
    )  # fmt: skip


def _retrigger_config(
    enabled: bool,
    probes: int,
    sigma: float,
    steps: int,
    lr: float,
    rho: float,
    generations: int,
    seed: int,
):  # -> RetriggerConfig (imported lazily)
    """The gate's re-trigger probe settings, shared by `run` and `eval`."""
    from diffcurate.models.retrigger import RetriggerConfig

    return RetriggerConfig(enabled=enabled, random_probes=probes, sigma=sigma, opt_steps=steps,
                           lr=lr, rho=rho, generations_per_probe=generations,
                           seed=seed)  # fmt: skip


def _generations_audit(settings, generations: int, min_share: float):
    """The generations audit of a hygiene run, from the ``attributes`` and ``clip`` settings."""
    from diffcurate.curation.generations import GenerationsAuditConfig
    from diffcurate.metrics.generations_audit import GenerationsAuditPolicy

    if generations == 1 or generations < 0:
        raise ValueError("--audit-generations takes 0 (off) or at least 2")
    return GenerationsAuditConfig(
        enabled=generations > 0, generations=max(generations, 2),
        attributes=settings.attributes, clip=settings.clip if settings.clip.enabled else None,
        policy=GenerationsAuditPolicy(min_share_ratio=min_share),
    )  # fmt: skip


def _print_generations_audit(audit: dict | None) -> None:
    """The generations audit's table: per attribute and group, share before -> after."""
    if audit is None:
        return
    result = audit.get("result")
    if result is None:
        err.print(f"[yellow]generations audit not measured:[/yellow] {safe(audit.get('why'))}")
        return
    t = Table("attribute", "group", "share before", "share after", "ratio", "judged",
              title=f"generations audit ({result['n_before']} generations per model)")  # fmt: skip
    for a in result["attributes"]:
        for g in a["groups"]:
            ratio = "" if g["share_ratio"] is None else f"{g['share_ratio']:.2f}"
            t.add_row(safe(a["attribute"]), safe(g["group"]), f"{100 * g['share_before']:.1f}%",
                      f"{100 * g['share_after']:.1f}%", ratio,
                      "yes" if g["judged"] else "no")  # fmt: skip
    out.print(t)
    for name, how in (audit.get("inferred_by") or {}).items():
        out.print(safe(f"{name}: {how}"))


def _print_hygiene(summary) -> None:
    t = Table(title=f"hygiene {summary.run_id}", show_header=False)
    t.add_row("score run", summary.score_run)
    t.add_row("flagged", f"{summary.n_flagged_images} distinct images = {summary.n_removed} "
              f"samples removed, {summary.n_kept} kept of {summary.n_samples}")  # fmt: skip
    if summary.audit_passed is None:
        audit = "not run (no group attributes)"
    elif summary.audit_passed:
        audit = "passed"
    else:
        audit = "FAILED: " + "; ".join(summary.audit_violations)
    t.add_row("audit", safe(f"{audit} ({', '.join(summary.audit_attributes) or '-'})"))
    if summary.audit_counts:
        c = summary.audit_counts
        t.add_row("audit unit", f"{summary.audit_unit} ({c.get('images')} distinct images, "
                  f"{c.get('samples')} samples)")  # fmt: skip
    for why in summary.audit_unit_disagreements:
        t.add_row("units disagree", safe(why))
    for name, how in summary.inferred_attributes.items():
        if name in summary.audit_attributes:
            t.add_row("inferred", safe(f"{name}: {how}"))
    t.add_row("mitigation", safe(summary.mitigation))
    copies = summary.secret_samples
    t.add_row("secrets", f"{len(summary.secrets)} distinct images"
              + (f" ({copies} samples with copies)" if copies > len(summary.secrets) else "")
              + safe(f" ({summary.secrets_source})"))  # fmt: skip
    t.add_row("utility reference", safe(summary.reference))
    if summary.geometry:
        g = summary.geometry
        t.add_row("geometry", f"{g.get('geometry')}: {g.get('cropped', 0)} cropped, "
                  f"{g.get('upscaled', 0)} upscaled, {g.get('padded', 0)} padded of "
                  f"{g.get('n_images', '?')}")  # fmt: skip
    if summary.geometry_warning:
        err.print(f"[yellow]warning:[/yellow] {safe(summary.geometry_warning)}")
    cal = summary.mem_calibration
    if summary.mem_tau is not None:
        how = ("fixed" if cal is None else
               f"calibrated: at most {100 * cal['fpr']:g}% of {cal['n_images']} reference images "
               f"count as reconstructed, observed {100 * cal['observed_fpr']:.1f}%")  # fmt: skip
        rule = summary.mem_rule or "tiled_l2"
        value = "distance ratio" if rule.startswith("relative") else "closest generation"
        t.add_row("Mem% rule", f"{rule}: {value} < {summary.mem_tau:.4g} ({how})")
        fpr = {k: v for k, v in summary.heldout_fpr.items() if v is not None}
        if fpr:
            when = ", ".join(f"{100 * v:.1f}% {k} mitigation" for k, v in fpr.items())
            t.add_row("held-out false positives", "share of the reference images counted as "
                      f"reconstructed: {when}")  # fmt: skip
    if summary.guidance_scale is not None:
        t.add_row("generation", f"each secret's caption, guidance {summary.guidance_scale:g}")
    t.add_row("candidate model", safe(summary.candidate_model))
    t.add_row(
        "time",
        f"{summary.seconds:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items())
        + ")",
    )
    out.print(t)
    g = Table("measure", "before", "after", title="memorization and utility")
    for key, label in (("mem_percent", "Mem%"), ("fd", "FD"), ("kid", "KID")):
        g.add_row(label, f"{summary.before[key]:.4g}", f"{summary.after[key]:.4g}")
    rt = summary.retrigger
    if rt is not None and rt.get("skipped"):
        g.add_row("re-trigger Mem%", "skipped", safe(rt["skipped"]))
    elif rt is not None:
        fmt_rt = lambda v: "not measured" if v is None else f"{v:.4g}"  # noqa: E731
        g.add_row("re-trigger Mem% (perturbed captions)", fmt_rt(rt["mem_percent"]["before"]),
                  fmt_rt(rt["mem_percent"]["after"]))  # fmt: skip
    closest = [(v["before"], v["after"]) for v in summary.per_secret.values()
               if v["before"] is not None and v["after"] is not None]  # fmt: skip
    if closest:
        b, a = fmean(c[0] for c in closest), fmean(c[1] for c in closest)
        g.add_row("closest generation per secret (mean)", f"{b:.4g}", f"{a:.4g}")
    out.print(g)
    _print_generations_audit(summary.generations_audit)
    gates = Table("check", "before", "after", "threshold", "result", "reason", title="gates")
    for c in summary.gates:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        reason = c["reason"] if len(c["reason"]) <= 160 else c["reason"][:157] + "..."
        gates.add_row(safe(c["name"]), fmt(c["value_before"]), fmt(c["value_after"]),
                      fmt(c["threshold"]), "pass" if c["passed"] else "FAIL",
                      safe(reason))  # fmt: skip
    out.print(gates)
    for e in summary.gate_table_errors:
        err.print(f"[red]gate table invalid:[/red] {safe(e)}")
    verdict = "PASSED" if summary.gate_passed else "FAILED"
    out.print(f"gate decision: {verdict}; candidate release {summary.release_tag} awaits "
              f"approval (`diffcurate release show {summary.release_tag}`)")  # fmt: skip
