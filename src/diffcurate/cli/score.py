"""``diffcurate score`` and ``diffcurate attribute``: risk scores and influence of a model's
training samples, and the riskiest-samples table both ``score`` and ``scores`` print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from diffcurate.cli.checks import check_datasets, check_file, check_model
from diffcurate.cli.common import (
    DaskAddressOpt,
    DaskWorkersOpt,
    GeometryOpt,
    LoraOpt,
    LoraScaleOpt,
    ModelConfigOpt,
    ThreadsOpt,
    VariantOpt,
    WorkspaceOpt,
    fail,
    load_options,
    out,
    preflight,
    safe,
    secret_list,
    workspace_settings,
)
from diffcurate.cli.scorer_options import OptionOpt, flag_settings, parse_options
from diffcurate.config import Settings

SCORER_HELP = (
    "loss | divergence | trace | cond-gap | ekfac | bif | trak | d-trak | global-hessian | "
    "random | clip-knn | dmin (sketches for `diffcurate attribute`), or a registered scorer."
)
ATTRIBUTE_HELP = "dmin | ekfac | bif | trak | d-trak, or a registered scorer that attributes."


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
    bif_states: Annotated[
        str,
        typer.Option(
            help="bif: posterior states for the shards: stored (C·T·d numbers on disk) | "
            "replay (each shard replays the keyed chains) | auto (stored up to 4 GiB)."
        ),
    ] = "auto",
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
    dask_address: DaskAddressOpt = None,
    dask_workers: DaskWorkersOpt = 2,
    top: Annotated[int, typer.Option(help="Riskiest samples to print.")] = 10,
    option: OptionOpt = None,
    variant: VariantOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    geometry: GeometryOpt = "center-crop",
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
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
    settings = workspace_settings(workspace, threads, existing=True)
    check_model(model, config=model_config, lora=lora, variant=variant)
    check_datasets(settings, dataset)
    try:
        flags = {
            "draws": draws, "probes": probes, "seed": seed, "generations": generations,
            "inference_steps": inference_steps, "measure_steps": measure_steps,
            "guidance_scale": guidance_scale, "fit_size": fit_size, "device": device,
            "dtype": dtype, "damping": damping, "fisher": fisher, "proj_dim": proj_dim,
            "sgld_chains": sgld_chains, "sgld_draws": sgld_draws,
            "sgld_step_size": sgld_step_size, "sgld_nbeta": sgld_nbeta,
            "sgld_localization": sgld_localization, "sgld_batch": sgld_batch,
            "bif_states": bif_states, "hessian_batch": hessian_batch, "knn_mode": knn_mode,
            "knn_tau": knn_tau, "knn_k": knn_k,
            "secrets": None if secrets is None else tuple(secret_list(secrets)),
            "sketch_dim": sketch_dim, "sketch_timesteps": sketch_timesteps,
        }  # fmt: skip
        chosen = flag_settings(scorer, flags)
        if timesteps is not None:
            chosen["timesteps"] = tuple(int(t) for t in timesteps.split(","))
        from diffcurate.influence.registry import ScorerSpec

        spec = ScorerSpec.from_settings(scorer, chosen | parse_options(option, [scorer])[scorer])
        from diffcurate.flows.score import ScoreParams, score_flow
        from diffcurate.flows.sharded import DaskOptions

        load = load_options(variant, None, lora, lora_scale, model_config, device)
        params = ScoreParams(
            dataset=dataset, model=model, load=load, scorer=spec, workspace=settings.workspace,
            shard_size=shard_size, resume=resume, runner=runner, geometry=geometry,
            dask=DaskOptions(address=dask_address, n_workers=dask_workers),
        )  # fmt: skip
    except (ValidationError, ValueError, OSError) as e:
        raise fail(str(e)) from e
    if model is not None and spec.uses_model:
        preflight(model, load, device)
    from diffcurate.models.diffusion import ModelLoadError

    try:
        summary = score_flow(params)
    except (FileNotFoundError, ModelLoadError, ValueError, KeyError) as e:
        raise fail(str(e)) from e
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
    print_top_scores(settings, summary.run_id, top)


def attribute(
    image: Annotated[Path, typer.Argument(help="Query image file (e.g. a generated image).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Local diffusers model dir.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Training samples to print.")] = 10,
    scorer: Annotated[str, typer.Option("--scorer", "-s", help=ATTRIBUTE_HELP)] = "dmin",
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
        str | None,
        typer.Option("--dataset", "-d", help="Training set (ekfac/bif/trak without --run)."),
    ] = None,
    caption: Annotated[
        str | None, typer.Option(help="Prompt of the query (text-conditional models).")
    ] = None,
    option: OptionOpt = None,
    variant: VariantOpt = None,
    lora: LoraOpt = None,
    lora_scale: LoraScaleOpt = 1.0,
    model_config: ModelConfigOpt = None,
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Print the training samples with the most influence on IMAGE, with their scores.

    `dmin` (default) answers from the sketches of a `diffcurate score --scorer dmin` run through
    the LanceDB vector index (`--exact`: flat scan); `ekfac`, `bif` (Cov = −BIF of query and
    training losses over the posterior draws) and `trak`/`d-trak` compute the exact influence
    of every dataset sample (slower), with a score run's settings or, without one, the
    defaults and `--option`s. High score = more influential.
    """
    settings = workspace_settings(workspace, threads, existing=True)
    check_file(image, "query image")
    check_model(model, config=model_config, lora=lora, variant=variant)
    check_datasets(settings, dataset)
    from diffcurate.attribution import AttributionError, attribute_image
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.images import ImageLoadError

    try:
        load = None
        if variant or lora or model_config:
            load = load_options(variant, None, lora, lora_scale, model_config)
        options = parse_options(option, [scorer])[scorer] if option else None
        result = attribute_image(
            settings.workspace, image, model, top_k=top_k, scorer=scorer, run_id=run,
            exact=exact, dataset=dataset, caption=caption, load=load, options=options,
        )  # fmt: skip
    except (AttributionError, ImageLoadError, ModelLoadError, FileNotFoundError, KeyError) as e:
        raise fail(str(e)) from e
    except (ValidationError, ValueError) as e:
        raise fail(str(e)) from e
    run_note = f" run {result.run_id}," if result.run_id else ""
    out.print(safe(
        f"{result.scorer} ({result.mode}) on {result.dataset!r},{run_note} "
        f"{result.searched} training samples searched in {1000 * result.seconds:.0f} ms"
    ))  # fmt: skip
    t = Table("rank", "score", title=f"top {len(result.rows)}")
    width = max((len(r["sample_id"]) for r in result.rows), default=9)
    t.add_column("sample_id", no_wrap=True, min_width=width)  # ids must stay copy-pastable
    t.add_column("key")
    t.add_column("caption")
    for rank, r in enumerate(result.rows, 1):
        t.add_row(str(rank), f"{r['score']:.5g}", safe(r["sample_id"]), safe(r["key"]),
                  safe(r["caption"]))  # fmt: skip
    out.print(t)


def print_top_scores(settings: Settings, run_id: str, top: int) -> None:
    """Print the ``top`` riskiest samples of a score run with their keys and captions."""
    from diffcurate.storage.lance_store import LanceStore

    store = LanceStore.open(settings.layout)
    rows = store.read(
        "scores", columns=["sample_id", "score", "stderr"], where={"run_id": run_id}
    ).to_pylist()
    if not rows:
        raise fail(f"no scores for run {run_id!r}")
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
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.2g}"
        t.add_row(str(rank), f"{r['score']:.5g}", stderr, safe(s.get("key", "?")),
                  safe(s.get("caption") or ""))  # fmt: skip
    out.print(t)
