"""The ``diffcurate`` command line.

Heavy imports (torch, prefect, lancedb) happen inside commands, after the workspace is known,
so ``--help`` is instant and ``PREFECT_HOME`` points into the workspace before Prefect loads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from statistics import fmean
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from diffcurate.config import Settings, apply_threads, load_settings
from diffcurate.dashboards.cli import serve, users_app
from diffcurate.deploy_cli import deploy_app
from diffcurate.release_cli import release_app

app = typer.Typer(
    name="diffcurate",
    help=(
        "Data curation for diffusion-model training sets: ingest image–caption corpora into "
        "LanceDB, score memorization risk, audit, and gate releases.\n\n"
        "Settings come from --workspace, DIFFCURATE_* environment variables "
        "(e.g. DIFFCURATE_CLIP__CHECKPOINT=/models/clip.pt) and ./diffcurate.toml."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping hard breaks
)
# soft_wrap: messages carry paths and ids that must stay copy-pastable; let terminals wrap.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Options that `run` and `eval` share.
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Flag images scoring at least this (instead of top).")
]
GroupByOpt = Annotated[
    str, typer.Option(help="Duplicate groups flagged as one image: exact | near | none.")
]
EpochsOpt = Annotated[int, typer.Option(help="Fine-tune epochs.")]
LrOpt = Annotated[float, typer.Option(help="Fine-tune learning rate.")]
RetrainStepsOpt = Annotated[int, typer.Option(help="Steps when retraining.")]
MitigationSeedOpt = Annotated[int, typer.Option(help="Seed of scoring, mitigation and sampling.")]

# How a checkpoint is held: every command that loads a model takes these.
VariantOpt = Annotated[
    str | None,
    typer.Option(
        help="Weights variant of every component, e.g. fp16 for *.fp16.safetensors "
        "[default: the plain weights, or the only variant present]."
    ),
]
LoadDTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Load the networks as float32 | float64 | float16 | bfloat16 (half precision "
        "needs --device cuda) [default: as saved].",
    ),
]
LoraOpt = Annotated[
    list[Path] | None,
    typer.Option("--lora", help="LoRA adapter (file or directory) fused at load; repeatable."),
]
LoraScaleOpt = Annotated[float, typer.Option(help="Multiplier of the LoRA updates.")]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option(
        help="For a single-file checkpoint (--model x.safetensors): a local diffusers "
        "directory with the component configs and tokenizer (nothing is downloaded)."
    ),
]
GeometryOpt = Annotated[
    str,
    typer.Option(
        help="How images become the model's square input: center-crop | resize | pad "
        "(counts of cropped/upscaled images are reported)."
    ),
]
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

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace directory [default: $DIFFCURATE_WORKSPACE or ./workspace].",
        show_default=False,
    ),
]


def _settings(workspace: Path | None) -> Settings:
    try:
        settings = load_settings(workspace)
    except (ValidationError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] invalid configuration:\n{e}")
        raise typer.Exit(2) from e
    settings.workspace.mkdir(parents=True, exist_ok=True)
    apply_threads(settings.threads)
    # Prefect's ephemeral mode keeps its state in PREFECT_HOME: keep it inside the workspace.
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home.resolve()))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral server's telemetry writer races the API for the SQLite lock.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its ephemeral server 20 s to start; a busy 2-core machine can need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # diffusers warns on every dtype cast of a UNet ("modules ... kept in float32: []").
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    return settings


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _load_options(
    variant: str | None,
    dtype: str | None,
    lora: list[Path] | None,
    lora_scale: float,
    model_config: Path | None,
    device: str = "cpu",
):  # -> LoadOptions (imported lazily)
    """The loading options of the model flags, checked against the device."""
    from diffcurate.models.load_options import LoadOptions

    options = LoadOptions(
        variant=variant, dtype=dtype, lora=list(lora or []), lora_scale=lora_scale,
        config=model_config,
    )  # fmt: skip
    options.check_device(device)
    return options


def _preflight(model: Path, options, device: str = "cpu"):  # -> DiffusionModel
    """Load the model before any flow starts: a bad checkpoint is one line, exit 2."""
    from diffcurate.models.errors import ModelLoadError
    from diffcurate.models.load_options import preflight

    try:
        return preflight(model, options, device)
    except (ModelLoadError, ValueError) as e:
        raise _fail(str(e)) from e


@app.command()
def ingest(
    source: Annotated[
        Path, typer.Argument(help="Image folder, parquet/CSV manifest, or .tar shard(s).")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="auto | folder | manifest | webdataset.")
    ] = "auto",
    image_column: Annotated[
        str | None, typer.Option(help="Manifest column with image bytes or paths.")
    ] = None,
    caption_column: Annotated[str | None, typer.Option(help="Manifest caption column.")] = None,
    key_column: Annotated[
        str | None, typer.Option(help="Manifest column with sample keys.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Rows per shard (unit of commit and resume).")
    ] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Ingest a corpus: decode, validate, hash, dedup, embed (if CLIP weights are configured).

    Re-running on the same source adds nothing; re-running after a crash completes it. Bad rows
    go to the `quarantine` table with a reason. Exits non-zero only when nothing could be
    ingested.
    """
    from diffcurate.ingest.sources import SourceError, SourceFormat, detect_format

    settings = _settings(workspace)
    try:
        fmt = SourceFormat(format)
    except ValueError:
        raise _fail(
            f"unknown --format {format!r}; use one of {[f.value for f in SourceFormat]}"
        ) from None
    try:  # refuse an unusable source before starting any machinery
        detect_format(source) if fmt == SourceFormat.AUTO else source.stat()
    except (SourceError, OSError) as e:
        raise _fail(f"cannot read source: {e}") from e
    ingest_cfg = settings.ingest
    if batch_size is not None:
        ingest_cfg = ingest_cfg.model_copy(update={"batch_size": batch_size})
    from diffcurate.flows.ingest import IngestParams, ingest_flow

    try:
        params = IngestParams(
            source=source,
            dataset=dataset,
            workspace=settings.workspace,
            format=fmt,
            image_column=image_column,
            caption_column=caption_column,
            key_column=key_column,
            clip=settings.clip,
            ingest=ingest_cfg,
        )
    except ValidationError as e:
        raise _fail(str(e)) from e
    if not settings.clip.enabled:
        err.print(
            "[yellow]note:[/yellow] CLIP embeddings disabled (no clip.checkpoint configured); "
            "ingesting without embeddings."
        )
    try:
        summary = ingest_flow(params)
    except (SourceError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from e
    _print_ingest_summary(summary)
    if summary.nothing_ingested:
        raise _fail("nothing could be ingested from this source", code=1)


def _print_ingest_summary(summary) -> None:
    t = Table(title=f"ingest {summary.run_id}", show_header=False)
    t.add_row("dataset", summary.dataset)
    t.add_row("source", f"{summary.source} ({summary.format})")
    t.add_row("records seen", str(summary.seen))
    t.add_row("ingested (new)", str(summary.ingested))
    t.add_row("already present", str(summary.already_present))
    t.add_row("quarantined", str(summary.quarantined))
    for reason, n in summary.quarantined_by_reason.items():
        t.add_row(f"  {reason}", str(n))
    d = summary.duplicates
    t.add_row(
        "exact duplicate groups",
        f"{d.get('exact_groups', 0)} groups, {d.get('exact_rows', 0)} samples",
    )
    t.add_row(
        "near duplicate groups",
        f"{d.get('near_groups', 0)} groups, {d.get('near_rows', 0)} samples",
    )
    t.add_row("embeddings", summary.embeddings)
    t.add_row("samples in dataset", str(summary.dataset_samples))
    t.add_row("time", f"{summary.seconds:.1f} s")
    out.print(t)


SCORER_HELP = (
    "loss | divergence | trace | cond-gap | ekfac | bif | trak | d-trak | global-hessian | "
    "random | clip-knn | dmin (sketches for `diffcurate attribute`)."
)


@app.command()
def score(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to score.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Local diffusers model dir (not for random/clip-knn)."),
    ] = None,
    scorer: Annotated[str, typer.Option("--scorer", "-s", help=SCORER_HELP)] = "divergence",
    timesteps: Annotated[
        str | None,
        typer.Option(help="Comma-separated timesteps [default: per scorer, see README]."),
    ] = None,
    draws: Annotated[int, typer.Option(help="Noise draws per timestep and sample.")] = 2,
    probes: Annotated[
        int | None,
        typer.Option(help="Hutchinson probes per draw [default: 2; global-hessian: 16 per batch]."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the draws, probes and fit set.")] = 0,
    generations: Annotated[int, typer.Option(help="cond-gap: initial noises per caption.")] = 4,
    inference_steps: Annotated[
        int, typer.Option(help="cond-gap: DDIM steps of the guided trajectory.")
    ] = 50,
    measure_steps: Annotated[
        int, typer.Option(help="cond-gap: first trajectory steps measured.")
    ] = 1,
    guidance_scale: Annotated[
        float, typer.Option(help="cond-gap: classifier-free guidance weight.")
    ] = 7.5,
    fit_size: Annotated[
        int,
        typer.Option(
            help="ekfac/bif/trak/d-trak: samples in the seeded fit set (curvature, SGLD "
            "set, kernel)."
        ),
    ] = 512,
    damping: Annotated[
        float | None,
        typer.Option(
            help="ekfac/trak/d-trak damping [default: ekfac 1e-8, trak 1e-3 x mean eigenvalue]."
        ),
    ] = None,
    fisher: Annotated[str, typer.Option(help="ekfac: mc | exact GGN targets.")] = "mc",
    proj_dim: Annotated[int, typer.Option(help="trak/d-trak: projection dimension.")] = 2048,
    sgld_chains: Annotated[int, typer.Option(help="bif: SGLD chains.")] = 4,
    sgld_draws: Annotated[int, typer.Option(help="bif: recorded draws per chain.")] = 100,
    sgld_step_size: Annotated[float, typer.Option(help="bif: SGLD step size.")] = 1e-5,
    sgld_nbeta: Annotated[float, typer.Option(help="bif: effective sample size nβ.")] = 200.0,
    sgld_localization: Annotated[float, typer.Option(help="bif: localisation γ.")] = 1e4,
    sgld_batch: Annotated[int, typer.Option(help="bif: SGLD minibatch size.")] = 1024,
    hessian_batch: Annotated[int, typer.Option(help="global-hessian: minibatch size.")] = 64,
    knn_mode: Annotated[
        str, typer.Option(help="clip-knn: duplicates | secret-max | secret-knn.")
    ] = "duplicates",
    knn_tau: Annotated[float, typer.Option(help="clip-knn: near-duplicate cosine.")] = 0.95,
    knn_k: Annotated[int, typer.Option(help="clip-knn: neighbours per secret.")] = 5,
    secrets: Annotated[
        str | None,
        typer.Option(help="clip-knn secret modes: JSON file or comma-separated keys/ids."),
    ] = None,
    sketch_dim: Annotated[int, typer.Option(help="dmin: sketch dimension per timestep.")] = 4096,
    sketch_timesteps: Annotated[
        int, typer.Option(help="dmin: evenly spaced timesteps (unless --timesteps).")
    ] = 10,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | float64.")] = "float32",
    shard_size: Annotated[int, typer.Option(help="Samples per shard (commit/resume unit).")] = 256,
    resume: Annotated[
        bool, typer.Option(help="Resume an interrupted run with identical settings.")
    ] = True,
    runner: Annotated[
        str,
        typer.Option(
            help="local: shards one after another here; dask: shards as task runs on "
            "a Dask cluster, each worker writing its rows (risk scorers only)."
        ),
    ] = "local",
    dask_address: Annotated[
        str | None,
        typer.Option(
            help="--runner dask: scheduler of an existing cluster (tcp://host:8786) "
            "[default: a temporary local cluster]."
        ),
    ] = None,
    dask_workers: Annotated[
        int, typer.Option(help="--runner dask: worker processes of the temporary cluster.")
    ] = 2,
    top: Annotated[int, typer.Option(help="Riskiest samples to print.")] = 10,
    variant: VariantOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
) -> None:
    """Score every sample's memorization risk with one scorer; writes the `scores` table.

    Signals: `divergence` (data-space Jacobian trace; the default: best recall of planted
    duplicates in benchmarks/risk_signals.py), `loss` (low per-sample diffusion loss; about 13x
    cheaper, finds exact duplicates as well), `trace` (per-sample GGN curvature trace, seed
    000), and for text-conditional models `cond-gap` (Wen et al.: how far the
    caption-conditional noise prediction departs from the unconditional one on the first
    sampling steps). Influence scorers: `ekfac`
    (EK-FAC self-influence), `bif` (posterior loss variance under localised SGLD), `trak` /
    `d-trak` (projected-gradient self-influence); baselines `global-hessian`, `random`,
    `clip-knn` (needs CLIP embeddings from ingest). High score = risky for all.
    `dmin` writes gradient sketches to the `sketches` table for `diffcurate attribute`.
    Text-conditional models are scored on each sample's caption, embedded by the model
    directory's own `text_encoder/` and `tokenizer/`.
    Re-running after a crash resumes the interrupted run without duplicating rows.
    """
    from diffcurate.influence.registry import (
        BIFOptions,
        ClipKNNOptions,
        DMinOptions,
        EKFACOptions,
        GlobalHessianOptions,
        ScorerSpec,
        TRAKOptions,
    )

    settings = _settings(workspace)
    try:
        steps = None if timesteps is None else tuple(int(t) for t in timesteps.split(","))
        gh = GlobalHessianOptions(batch_size=hessian_batch)
        if probes is not None:
            gh = gh.model_copy(update={"probes": probes})
        spec = ScorerSpec(
            signal=scorer, timesteps=steps, draws_per_timestep=draws, probes=probes or 2,
            seed=seed, device=device, dtype=dtype, generations=generations,
            inference_steps=inference_steps, measure_steps=measure_steps,
            guidance_scale=guidance_scale, fit_size=fit_size,
            ekfac=EKFACOptions(fisher=fisher, **({} if damping is None else {"damping": damping})),
            bif=BIFOptions(chains=sgld_chains, draws=sgld_draws, step_size=sgld_step_size,
                           nbeta=sgld_nbeta, localization=sgld_localization,
                           batch_size=sgld_batch),
            trak=TRAKOptions(proj_dim=proj_dim, damping=damping),
            global_hessian=gh,
            clip_knn=ClipKNNOptions(mode=knn_mode, tau=knn_tau, k=knn_k,
                                    secrets=tuple(_secret_list(secrets))),
            dmin=DMinOptions(sketch_dim=sketch_dim, n_timesteps=sketch_timesteps),
        )  # fmt: skip
        from diffcurate.flows.score import ScoreParams, score_flow
        from diffcurate.flows.sharded import DaskOptions

        load = _load_options(variant, None, lora, lora_scale, model_config, device)
        params = ScoreParams(
            dataset=dataset, model=model, load=load, scorer=spec, workspace=settings.workspace,
            shard_size=shard_size, resume=resume, runner=runner, geometry=geometry,
            dask=DaskOptions(address=dask_address, n_workers=dask_workers),
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise _fail(str(e)) from e
    if model is not None and spec.uses_model:
        _preflight(model, load, device)
    from diffcurate.models.diffusion import ModelLoadError

    try:
        summary = score_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError) as e:
        raise _fail(str(e)) from e
    t = Table(title=f"score {summary.run_id}", show_header=False)
    at = f" at t={summary.timesteps}" if summary.timesteps else ""
    t.add_row("signal", f"{summary.signal} ({summary.method}){at}")
    t.add_row("samples", str(summary.samples))
    t.add_row("scored now" if spec.is_risk else "sketched now", str(summary.scored))
    t.add_row("resumed", f"yes, {summary.already_scored} already done" if summary.resumed else "no")
    if summary.fit_size:
        t.add_row("fit set", f"{summary.fit_size} samples ({summary.state_seconds:.1f} s)")
    if not spec.is_risk:
        t.add_row(
            "sketches", f"table {summary.sketch_table}, index {summary.sketch_index or 'none'}"
        )
        t.add_row("time", f"{summary.seconds:.1f} s")
        out.print(t)
        out.print(
            f"attribute with: diffcurate attribute IMAGE --model {model} --run {summary.run_id}"
        )
        return
    t.add_row(
        "score quantiles", ", ".join(f"q{k}={v:.4g}" for k, v in summary.score_quantiles.items())
    )
    t.add_row("time", f"{summary.seconds:.1f} s")
    out.print(t)
    _print_top_scores(settings, summary.run_id, top)


@app.command()
def attribute(
    image: Annotated[Path, typer.Argument(help="Query image file (e.g. a generated image).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Training samples to print.")] = 10,
    scorer: Annotated[
        str, typer.Option("--scorer", "-s", help="dmin | ekfac | trak | d-trak.")
    ] = "dmin",
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Score run whose sketches (dmin) or settings to use "
            "[default: the newest completed one for this model].",
        ),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="dmin: flat scan of all sketches instead of the index.")
    ] = False,
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="Training set (ekfac/trak without --run).")
    ] = None,
    caption: Annotated[
        str | None, typer.Option(help="Prompt of the query (text-conditional models).")
    ] = None,
    variant: VariantOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Print the training samples with the most influence on IMAGE, with their scores.

    `dmin` (default) answers from the sketches of a `diffcurate score --scorer dmin` run through
    the LanceDB vector index (`--exact`: flat scan); `ekfac` and `trak`/`d-trak` compute the
    exact influence of every dataset sample (slower). High score = more influential.
    """
    settings = _settings(workspace)
    from diffcurate.attribution import AttributionError, attribute_image
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.images import ImageLoadError

    try:
        load = None
        if variant or lora or model_config:
            load = _load_options(variant, None, lora, lora_scale, model_config)
        result = attribute_image(
            settings.workspace, image, model, top_k=top_k, scorer=scorer, run_id=run,
            exact=exact, dataset=dataset, caption=caption, load=load,
        )  # fmt: skip
    except (AttributionError, ImageLoadError, ModelLoadError, FileNotFoundError, KeyError) as e:
        raise _fail(str(e)) from e
    except (ValidationError, ValueError) as e:
        raise _fail(str(e)) from e
    run_note = f" run {result.run_id}," if result.run_id else ""
    out.print(
        f"{result.scorer} ({result.mode}) on {result.dataset!r},{run_note} "
        f"{result.searched} training samples searched in {1000 * result.seconds:.0f} ms"
    )
    t = Table("rank", "score", title=f"top {len(result.rows)}")
    width = max((len(r["sample_id"]) for r in result.rows), default=9)
    t.add_column("sample_id", no_wrap=True, min_width=width)  # ids must stay copy-pastable
    t.add_column("key")
    t.add_column("caption")
    for rank, r in enumerate(result.rows, 1):
        t.add_row(str(rank), f"{r['score']:.5g}", r["sample_id"], r["key"], r["caption"])
    out.print(t)


def _print_top_scores(settings: Settings, run_id: str, top: int) -> None:
    from diffcurate.storage.lance_store import LanceStore

    store = LanceStore(settings.lancedb_uri)
    rows = store.read(
        "scores", columns=["sample_id", "score", "stderr"], where={"run_id": run_id}
    ).to_pylist()
    if not rows:
        raise _fail(f"no scores for run {run_id!r}")
    rows = sorted(rows, key=lambda r: -r["score"])[:top]
    samples = {
        r["sample_id"]: r
        for r in store.read(
            "samples", columns=["sample_id", "key", "caption"],
            where={"sample_id": [r["sample_id"] for r in rows]},
        ).to_pylist()
    }  # fmt: skip
    t = Table("rank", "score", "± stderr", "key", "caption", title=f"riskiest {len(rows)}")
    for rank, r in enumerate(rows, 1):
        s = samples.get(r["sample_id"], {})
        t.add_row(str(rank), f"{r['score']:.5g}", f"{r['stderr']:.2g}", s.get("key", "?"),
                  s.get("caption", ""))  # fmt: skip
    out.print(t)


@app.command()
def scores(
    run_id: Annotated[str, typer.Argument(help="A score run id (see `diffcurate runs`).")],
    top: Annotated[int, typer.Option(help="Riskiest samples to print.")] = 20,
    workspace: WorkspaceOpt = None,
) -> None:
    """Print the riskiest samples of a scoring run."""
    _print_top_scores(_settings(workspace), run_id, top)


@app.command()
def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to train on.")],
    name: Annotated[
        str | None,
        typer.Option(help="Model name under WORKSPACE/models [default: DATASET-ARCH]."),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="Reference architecture: digits-8px | tiny (pixel DDPMs) | sd-tiny (latent "
            "text-to-image: VAE + CLIP text encoder + cross-attention UNet, RGB 32x32)."
        ),
    ] = "digits-8px",
    prediction: Annotated[str, typer.Option(help="epsilon | v_prediction.")] = "epsilon",
    steps: Annotated[int, typer.Option(help="Total optimisation steps of the UNet.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of init, batches, timesteps and noise.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval (steps).")] = 500,
    vae_steps: Annotated[
        int, typer.Option(help="sd-tiny: VAE training steps (run once, before the UNet).")
    ] = 1500,
    caption_dropout: Annotated[
        float,
        typer.Option(help="sd-tiny: share of captions replaced by the empty one (for CFG)."),
    ] = 0.1,
    geometry: GeometryOpt = "center-crop",
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    workspace: WorkspaceOpt = None,
) -> None:
    """Train a reference diffusion model on an ingested dataset (resumes if re-run).

    Checkpoints go to WORKSPACE/models/NAME/checkpoints/step-N/, each a complete model
    directory that `diffcurate score --model` and `diffcurate sample --model` accept (for
    sd-tiny a full Stable-Diffusion-layout pipeline). sd-tiny first trains its VAE
    (--vae-steps, saved once to WORKSPACE/models/NAME/base/), then the UNet on the VAE's
    latents with the frozen text encoder's caption states.
    """
    import time

    settings = _settings(workspace)
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.images import GEOMETRIES, ImageLoadError
    from diffcurate.models.reference import SchedulerConfig
    from diffcurate.models.reference_training import prepare_reference_training
    from diffcurate.models.train import TrainConfig
    from diffcurate.models.train import train as train_model
    from diffcurate.models.vae_train import VAEConfig
    from diffcurate.storage.lance_store import LanceStore, validate_dataset_name
    from diffcurate.storage.ledger import Ledger

    name = name or f"{dataset}-{arch}"
    model_dir = settings.models_dir / name
    try:
        validate_dataset_name(dataset)
        validate_dataset_name(name)
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown --geometry {geometry!r}; use center-crop, resize or pad")
        config = TrainConfig(
            steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            checkpoint_every=checkpoint_every, device=device,
            caption_dropout=caption_dropout if arch == "sd-tiny" else 0.0,
        )  # fmt: skip
        vae_config = VAEConfig(steps=vae_steps, seed=seed, device=device)
        scheduler = SchedulerConfig(prediction_type=prediction)
    except (ValidationError, ValueError, KeyError) as e:
        raise _fail(str(e)) from e
    ledger = Ledger(settings.ledger_path)
    run_id = ledger.start_run(
        "train", dataset=dataset, source=arch,
        params={"name": name, "arch": arch, "prediction": prediction, "geometry": geometry,
                "vae_steps": vae_steps, **config.model_dump()},
    )  # fmt: skip
    started = time.perf_counter()
    try:
        data = prepare_reference_training(
            LanceStore(settings.lancedb_uri), dataset, arch, model_dir, seed=seed,
            scheduler=scheduler, vae=vae_config, geometry=geometry, progress=True,
        )  # fmt: skip
        if data.vae is not None:
            out.print(
                f"trained the {arch} VAE: {vae_steps} steps, reconstruction RMSE "
                f"{data.vae.recon_rmse:.4f} ({data.vae.seconds:.1f} s)"
            )
        if (warning := data.geometry.warning()) is not None:
            err.print(f"[yellow]warning:[/yellow] {warning}")
        result = train_model(
            data.model, data.x0, config, checkpoint_dir=model_dir / "checkpoints",
            conditioning=data.conditioning, unconditional=data.unconditional,
        )  # fmt: skip
    except (ValidationError, ValueError, KeyError, ImageLoadError) as e:
        ledger.finish_run(run_id, status="failed", error=repr(e))
        raise _fail(str(e)) from e
    except (FloatingPointError, ModelLoadError) as e:
        ledger.finish_run(run_id, status="failed", error=repr(e))
        raise _fail(str(e)) from e
    tail = result.losses[-100:]
    stats = {
        "images": len(data.sample_ids), "start_step": result.start_step,
        "final_step": result.final_step, "model": str(result.checkpoint),
        "final_loss": sum(tail) / max(len(tail), 1),
        "geometry": data.geometry.model_dump(mode="json"),
        "vae_recon_rmse": None if data.vae is None else data.vae.recon_rmse,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    ledger.finish_run(run_id, status="completed", stats=stats)
    out.print(
        f"trained {arch} on {stats['images']} images: steps {result.start_step} -> "
        f"{result.final_step}, final loss {stats['final_loss']:.4f}, {stats['seconds']} s\n"
        f"model: {result.checkpoint}"
    )


@app.command()
def sample(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Local diffusers model dir or checkpoint file.")
    ],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write.")],
    n: Annotated[int, typer.Option("--n", help="Images to generate.")] = 64,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            help="Text-conditional models: the caption to generate from (repeatable: the "
            "prompts are cycled over the n images)."
        ),
    ] = None,
    guidance_scale: Annotated[
        float, typer.Option(help="Classifier-free guidance weight (text-conditional models).")
    ] = 7.5,
    seed: Annotated[int, typer.Option(help="Seed (image i uses (seed, i)).")] = 0,
    sampler: Annotated[str, typer.Option(help="ddim | ddpm.")] = "ddim",
    inference_steps: Annotated[
        int | None, typer.Option(help="Denoising steps [default: 50 ddim, T ddpm].")
    ] = None,
    scale: Annotated[int, typer.Option(help="Upscale factor of the grid (nearest).")] = 8,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    variant: VariantOpt = None,
    dtype: LoadDTypeOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
) -> None:
    """Generate images from a local model and save them as a PNG grid.

    Text-conditional pipelines generate from `--prompt` under classifier-free guidance
    (`--guidance-scale`, 1 = no guidance), as the diffusers text-to-image pipeline does.
    """
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.sample import generate, save_grid

    if sampler not in ("ddim", "ddpm"):
        raise _fail(f"unknown --sampler {sampler!r}; use ddim or ddpm")
    try:
        options = _load_options(variant, dtype, lora, lora_scale, model_config, device)
    except (ValidationError, ValueError) as e:
        raise _fail(str(e)) from e
    loaded = _preflight(model, options, device)
    try:
        kwargs: dict[str, object] = {}
        if loaded.conditional:
            if not prompt:
                raise ValueError(
                    f"{model} is a text-conditional model: give --prompt TEXT (repeatable)"
                )
            if loaded.text_encoder is None:
                raise ValueError(f"{model} has no text_encoder/ to embed --prompt with")
            prompts = [prompt[i % len(prompt)] for i in range(n)]
            kwargs["conditioning"] = loaded.text_encoder.encode(prompts)
            if guidance_scale != 1.0:
                kwargs["guidance_scale"] = guidance_scale
                kwargs["unconditional"] = loaded.text_encoder.encode([""])
        elif prompt:
            raise ValueError(f"{model} is unconditional: --prompt does not apply")
        images = generate(
            loaded, n, seed=seed, sampler=sampler, num_inference_steps=inference_steps,
            device=device, **kwargs,
        )  # fmt: skip
    except (ModelLoadError, ValueError) as e:
        raise _fail(str(e)) from e
    path = save_grid(images, out_file, scale=scale)
    out.print(f"wrote {n} samples to {path}")


@app.command("run")
def run_hygiene(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to clean.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    scorer: Annotated[
        str, typer.Option("--scorer", "-s", help="Risk signal (see `diffcurate score`).")
    ] = "divergence",
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
            help="Metadata key to audit (repeatable) [default: every key with 2-20 "
            "distinct values]."
        ),
    ] = None,
    mitigation: Annotated[
        str, typer.Option(help="finetune (surgical, lr 2e-6, 1 epoch) | retrain.")
    ] = "finetune",
    epochs: EpochsOpt = 1,
    lr: LrOpt = 2e-6,
    retrain_steps: RetrainStepsOpt = 3000,
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
    seed: MitigationSeedOpt = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    variant: VariantOpt = None,
    dtype: LoadDTypeOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
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
    settings = _settings(workspace)
    try:
        from diffcurate.curation.flag import FlagPolicy
        from diffcurate.curation.gate import GatePolicy
        from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
        from diffcurate.influence.registry import ScorerSpec
        from diffcurate.models.mitigate import MitigationConfig

        load = _load_options(variant, dtype, lora, lora_scale, model_config, device)
        measure = _measure_config(
            generations, seed, device, mem_tau, mem_calibrate_fpr, mem_rule, guidance_scale,
            generations_per_secret, inference_steps,
        )  # fmt: skip
        flag = (
            FlagPolicy(mode="threshold", threshold=threshold, fairness_cap=fairness_cap)
            if threshold is not None
            else FlagPolicy(fraction=fraction, fairness_cap=fairness_cap)
        )
        params = HygieneParams(
            dataset=dataset, model=model, load=load, geometry=geometry,
            workspace=settings.workspace,
            scorer=ScorerSpec(signal=scorer, seed=seed, device=device), score_run=score_run,
            flag=flag, group_by=group_by, fairness_attribute=fairness_attribute,
            audit_attributes=audit_attribute or None,
            mitigation=MitigationConfig(method=mitigation, epochs=epochs, lr=lr,
                                        retrain_steps=retrain_steps, seed=seed, device=device),
            secrets=_secret_list(secrets), heldout_dataset=heldout_dataset, measure=measure,
            gate=GatePolicy(max_mem_percent_after=max_mem,
                            max_relative_fd_increase=max_fd_increase),
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise _fail(str(e)) from e
    _preflight(model, load, device)
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.storage.releases import ReleaseError

    try:
        summary = hygiene_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError, ReleaseError) as e:
        raise _fail(str(e)) from e
    _print_hygiene(summary)
    if not summary.gate_passed:
        raise typer.Exit(1)


@app.command("eval")
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
    fraction: Annotated[
        float, typer.Option(help="Budget: the top fraction of distinct images, for every scorer.")
    ] = 0.01,
    threshold: ThresholdOpt = None,
    group_by: GroupByOpt = "exact",
    mitigation: Annotated[
        str, typer.Option(help="Comma-separated: finetune (surgical) and/or retrain.")
    ] = "finetune",
    epochs: EpochsOpt = 1,
    lr: LrOpt = 2e-6,
    retrain_steps: RetrainStepsOpt = 3000,
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
    seed: MitigationSeedOpt = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    variant: VariantOpt = None,
    dtype: LoadDTypeOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
) -> None:
    """Compare risk scorers on your dataset, model and secrets: prune, mitigate, measure.

    For each scorer: score the dataset (resumable), flag the same budget, mitigate, and measure
    Mem% of the secrets (one τ for every model) and FD/KID. Controls: the original model, and
    each mitigation on every sample (no pruning). Nothing is released; the table goes to the
    ledger as an `eval` run. Cost: one scoring run per scorer plus one mitigation and one
    measurement per scorer x mitigation.
    """
    settings = _settings(workspace)
    try:
        from diffcurate.curation.flag import FlagPolicy
        from diffcurate.flows.evaluate import EvalParams
        from diffcurate.influence.registry import ScorerSpec
        from diffcurate.models.mitigate import MitigationConfig

        load = _load_options(variant, dtype, lora, lora_scale, model_config, device)
        measure = _measure_config(
            generations, seed, device, mem_tau, mem_calibrate_fpr, mem_rule, guidance_scale,
            generations_per_secret, inference_steps,
        )  # fmt: skip
        flag = (
            FlagPolicy(mode="threshold", threshold=threshold)
            if threshold is not None
            else FlagPolicy(fraction=fraction)
        )
        params = EvalParams(
            dataset=dataset, model=model, load=load, geometry=geometry,
            workspace=settings.workspace,
            secrets=_secret_list(secrets),
            scorers=[ScorerSpec(signal=s.strip(), seed=seed, device=device)
                     for s in scorers.split(",") if s.strip()],
            flag=flag, group_by=group_by,
            mitigations=[MitigationConfig(method=m.strip(), epochs=epochs, lr=lr,
                                          retrain_steps=retrain_steps, seed=seed, device=device)
                         for m in mitigation.split(",") if m.strip()],
            heldout_dataset=heldout_dataset, measure=measure,
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise _fail(str(e)) from e
    _preflight(model, load, device)
    from diffcurate.flows.evaluate import eval_flow
    from diffcurate.models.diffusion import ModelLoadError

    try:
        summary = eval_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError) as e:
        raise _fail(str(e)) from e
    t = Table(title=f"eval {summary.run_id}: {len(summary.secrets)} secrets, τ "
              f"{summary.mem_tau:.4g}; FD/KID reference: {summary.reference}")  # fmt: skip
    t.add_column("scorer", no_wrap=True)
    t.add_column("mitigation", no_wrap=True)
    for name in ("removed images/samples", "secrets removed", "Mem%", "FD (vs none)", "KID",
                 "score s"):  # fmt: skip
        t.add_column(name, justify="right")
    control = {r.mitigation: r for r in summary.rows if r.scorer == "none"}
    for r in summary.rows:
        base = control.get(r.mitigation)
        rel = "" if base is None or r is base else f" ({100 * (r.fd - base.fd) / base.fd:+.1f}%)"
        pruned = r.scorer not in ("none", "original")
        t.add_row(r.scorer, r.mitigation,
                  f"{r.flagged_images}/{r.removed_samples}" if pruned else "",
                  f"{r.secrets_removed}/{len(summary.secrets)}" if pruned else "",
                  f"{r.mem_percent:.1f}", f"{r.fd:.4g}{rel}", f"{r.kid:.4g}",
                  f"{r.score_seconds:.1f}" if pruned else "")  # fmt: skip
    out.print(t)
    out.print("controls: 'original' = the model as given; 'none' = the mitigation on every "
              "sample (no pruning): compare each scorer's row with the 'none' row of its "
              "mitigation.")  # fmt: skip


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
        inference_steps=inference_steps,
    )  # fmt: skip


def _secret_list(value: str | None) -> list[str]:
    """Secrets from a JSON file (list or {"planted_keys": [...]}) or a comma-separated list."""
    if value is None:
        return []
    path = Path(value)
    if path.suffix == ".json" or path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("planted_keys", data.get("secrets"))
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{path}: expected a list of keys/ids or {{'planted_keys': [...]}}")
        return data
    return [v.strip() for v in value.split(",") if v.strip()]


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
    t.add_row("audit", f"{audit} ({', '.join(summary.audit_attributes) or '-'})")
    t.add_row("mitigation", summary.mitigation)
    copies = summary.secret_samples
    t.add_row("secrets", f"{len(summary.secrets)} distinct images"
              + (f" ({copies} samples with copies)" if copies > len(summary.secrets) else "")
              + f" ({summary.secrets_source})")  # fmt: skip
    t.add_row("utility reference", summary.reference)
    if summary.geometry:
        g = summary.geometry
        t.add_row("geometry", f"{g.get('geometry')}: {g.get('cropped', 0)} cropped, "
                  f"{g.get('upscaled', 0)} upscaled, {g.get('padded', 0)} padded of "
                  f"{g.get('n_images', '?')}")  # fmt: skip
    if summary.geometry_warning:
        err.print(f"[yellow]warning:[/yellow] {summary.geometry_warning}")
    cal = summary.mem_calibration
    if summary.mem_tau is not None:
        how = ("fixed" if cal is None else
               f"calibrated: at most {100 * cal['fpr']:g}% of {cal['n_images']} reference images "
               f"count as reconstructed, observed {100 * cal['observed_fpr']:.1f}%")  # fmt: skip
        rule = summary.mem_rule or "tiled_l2"
        value = "distance ratio" if rule.startswith("relative") else "closest generation"
        t.add_row("Mem% rule", f"{rule}: {value} < {summary.mem_tau:.4g} ({how})")
        fpr = summary.heldout_fpr.get("before")
        if fpr is not None:
            t.add_row("held-out false positives", f"{100 * fpr:.1f}% of the reference images "
                      "count as reconstructed by the model before mitigation")  # fmt: skip
    if summary.guidance_scale is not None:
        t.add_row("generation", f"each secret's caption, guidance {summary.guidance_scale:g}")
    t.add_row("candidate model", summary.candidate_model)
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
    closest = [(v["before"], v["after"]) for v in summary.per_secret.values()
               if v["before"] is not None and v["after"] is not None]  # fmt: skip
    if closest:
        b, a = fmean(c[0] for c in closest), fmean(c[1] for c in closest)
        g.add_row("closest generation per secret (mean)", f"{b:.4g}", f"{a:.4g}")
    out.print(g)
    gates = Table("check", "before", "after", "threshold", "result", "reason", title="gates")
    for c in summary.gates:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        reason = c["reason"] if len(c["reason"]) <= 160 else c["reason"][:157] + "..."
        gates.add_row(c["name"], fmt(c["value_before"]), fmt(c["value_after"]),
                      fmt(c["threshold"]), "pass" if c["passed"] else "FAIL",
                      reason)  # fmt: skip
    out.print(gates)
    for e in summary.gate_table_errors:
        err.print(f"[red]gate table invalid:[/red] {e}")
    verdict = "PASSED" if summary.gate_passed else "FAILED"
    out.print(f"gate decision: {verdict}; candidate release {summary.release_tag} awaits "
              f"approval (`diffcurate release show {summary.release_tag}`)")  # fmt: skip


@app.command("demo-corpus")
def demo_corpus(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the corpus into.")],
    kind: Annotated[
        str,
        typer.Option(
            help="digits (scikit-learn 8x8 digits, for pixel DDPMs) | photos (32x32 crops of "
            "scikit-image's photos with captions, for text-to-image pipelines such as sd-tiny)."
        ),
    ] = "digits",
    format: Annotated[
        str, typer.Option("--format", "-f", help="folder | manifest | webdataset.")
    ] = "webdataset",
    n_duplicated: Annotated[
        int | None,
        typer.Option(help="Images planted as exact duplicates [default: digits 10, photos 3]."),
    ] = None,
    copies: Annotated[
        int | None,
        typer.Option(help="Total copies of each planted image [default: digits 30, photos 20]."),
    ] = None,
    near: Annotated[
        int, typer.Option(help="photos: images planted as near duplicates (shifted, noisy).")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed choosing the planted images.")] = 0,
    heldout: Annotated[
        int | None,
        typer.Option(
            help="Images left out of training, written to OUT_DIR/heldout (ingest them as a "
            "held-out dataset for FD/KID and Mem% calibration) [default: digits 300, photos 50]."
        ),
    ] = None,
) -> None:
    """Write a bundled demo corpus with planted memorization secrets (see planted.json)."""
    from diffcurate.demo.corpus import CorpusFormat, build_demo_corpus

    try:
        fmt = CorpusFormat(format)
    except ValueError:
        raise _fail(
            f"unknown --format {format!r}; use one of {[f.value for f in CorpusFormat]}"
        ) from None
    if kind not in ("digits", "photos"):
        raise _fail(f"unknown --kind {kind!r}; use digits or photos")
    photos = kind == "photos"
    n_dup = n_duplicated if n_duplicated is not None else (3 if photos else 10)
    n_copies = copies if copies is not None else (20 if photos else 30)
    n_held = heldout if heldout is not None else (50 if photos else 300)
    try:
        if photos:
            from diffcurate.demo.photos import write_photo_corpus

            corpus = write_photo_corpus(out_dir, fmt=fmt, heldout=n_held, secrets=n_dup,
                                        near_secrets=near, copies=n_copies, seed=seed)  # fmt: skip
        else:
            corpus = build_demo_corpus(out_dir, fmt, n_duplicated=n_dup, copies=n_copies,
                                       seed=seed, n_heldout=n_held)  # fmt: skip
    except ValueError as e:
        raise _fail(str(e)) from e
    out.print(
        f"wrote {corpus.n_samples} samples ({corpus.format.value}) to {corpus.path}; "
        f"{len(corpus.planted_keys)} images planted x{n_copies} (see {out_dir / 'planted.json'})"
    )
    if photos:
        out.print(
            f"{corpus.n_distinct} distinct images; {corpus.n_non_square} non-square and "
            f"{corpus.n_small} smaller than 32 px (for the geometry policy); exact secrets: "
            f"{', '.join(corpus.exact_keys)}; near secrets: {', '.join(corpus.near_keys)}"
        )
    if corpus.heldout_path is not None:
        out.print(f"held out {corpus.n_heldout} images (never trained on) in {corpus.heldout_path}")


@app.command()
def runs(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (ingest, score, ...).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """List runs recorded in the ledger, newest first."""
    from diffcurate.storage.ledger import Ledger

    settings = _settings(workspace)
    rows = Ledger(settings.ledger_path).runs(kind=kind, dataset=dataset)
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    t = Table("run_id", "kind", "dataset", "status", "started", "seconds", "rows", "quarantined")
    for r in rows:
        s = r["stats"]
        t.add_row(
            r["run_id"],
            r["kind"],
            r["dataset"] or "",
            r["status"],
            f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
            "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            str(s.get("ingested", "")),
            str(s.get("quarantined", "")),
        )
    out.print(t)


@app.command()
def quarantine(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(help="Rows to show.")] = 50,
    workspace: WorkspaceOpt = None,
) -> None:
    """Show quarantined rows with their reasons (counts per reason first)."""
    from collections import Counter

    from diffcurate.storage.lance_store import LanceStore

    settings = _settings(workspace)
    store = LanceStore(settings.lancedb_uri)
    table = store.read(
        "quarantine", dataset=dataset, columns=["dataset", "key", "source", "reason", "detail"]
    ).to_pylist()
    if reason is not None:
        table = [r for r in table if r["reason"] == reason]
    counts = Counter(r["reason"] for r in table)
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "quarantine is empty")
    t = Table("dataset", "key", "reason", "detail", "source")
    for r in table[:limit]:
        t.add_row(r["dataset"], r["key"], r["reason"], r["detail"], r["source"])
    if table:
        out.print(t)


@app.command()
def datasets(workspace: WorkspaceOpt = None) -> None:
    """Datasets in the workspace with sample, quarantine and duplicate counts."""
    from collections import Counter

    from diffcurate.storage.lance_store import LanceStore

    settings = _settings(workspace)
    store = LanceStore(settings.lancedb_uri)
    samples = Counter(store.read("samples", columns=["dataset"]).column("dataset").to_pylist())
    quarantined = Counter(
        store.read("quarantine", columns=["dataset"]).column("dataset").to_pylist()
    )
    dups = store.read("duplicates", columns=["dataset", "exact_group_size"]).to_pylist()
    in_dup = Counter(r["dataset"] for r in dups if r["exact_group_size"] > 1)
    t = Table("dataset", "samples", "quarantined", "in exact-duplicate groups")
    for name in sorted(set(samples) | set(quarantined)):
        t.add_row(name, str(samples[name]), str(quarantined[name]), str(in_dup[name]))
    out.print(t)


@app.command()
def config(workspace: WorkspaceOpt = None) -> None:
    """Print the effective configuration (after environment and diffcurate.toml)."""
    settings = _settings(workspace)
    out.print_json(settings.model_dump_json())


app.add_typer(release_app, name="release", help="List, show, approve or reject candidate releases.")
app.add_typer(users_app, name="users", help="Add or list review-dashboard users.")
app.command("serve")(serve)
app.add_typer(deploy_app, name="deploy", help="Work pools, deployments and schedules at scale.")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
