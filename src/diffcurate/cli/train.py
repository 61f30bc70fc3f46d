"""``diffcurate train`` and ``diffcurate sample``: reference models, trained and sampled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

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
    workspace_settings,
)
from diffcurate.config import apply_threads


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
    threads: ThreadsOpt = None,
) -> None:
    """Train a reference diffusion model on an ingested dataset (resumes if re-run).

    Checkpoints go to WORKSPACE/models/NAME/checkpoints/step-N/, each a complete model
    directory that `diffcurate score --model` and `diffcurate sample --model` accept (for
    sd-tiny a full Stable-Diffusion-layout pipeline). sd-tiny first trains its VAE
    (--vae-steps, saved once to WORKSPACE/models/NAME/base/), then the UNet on the VAE's
    latents with the frozen text encoder's caption states.
    """
    settings = workspace_settings(workspace, threads, existing=True)
    check_datasets(settings, dataset)
    from diffcurate.flows.train import TrainParams, train_flow
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.images import GEOMETRIES, ImageLoadError
    from diffcurate.models.schedule import SchedulerConfig
    from diffcurate.models.train import TrainConfig
    from diffcurate.models.vae_train import VAEConfig
    from diffcurate.storage.lance_store import validate_dataset_name

    name = name or f"{dataset}-{arch}"
    try:
        validate_dataset_name(dataset)
        validate_dataset_name(name)
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown --geometry {geometry!r}; use center-crop, resize or pad")
        params = TrainParams(
            dataset=dataset, name=name, arch=arch, geometry=geometry,
            scheduler=SchedulerConfig(prediction_type=prediction),
            train=TrainConfig(
                steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                checkpoint_every=checkpoint_every, device=device,
                caption_dropout=caption_dropout if arch == "sd-tiny" else 0.0,
            ),
            vae=VAEConfig(steps=vae_steps, seed=seed, device=device),
            workspace=settings.workspace, progress=True,
        )  # fmt: skip
    except (ValidationError, ValueError, KeyError) as e:
        raise fail(str(e)) from e
    try:
        summary = train_flow(params)
    except (ValidationError, ValueError, KeyError, ImageLoadError) as e:
        raise fail(str(e)) from e
    except (FloatingPointError, ModelLoadError) as e:
        raise fail(str(e)) from e
    if summary.vae_seconds is not None:
        out.print(
            f"trained the {arch} VAE: {vae_steps} steps, reconstruction RMSE "
            f"{summary.vae_recon_rmse:.4f} ({summary.vae_seconds:.1f} s)"
        )
    if summary.geometry_warning is not None:
        err.print(f"[yellow]warning:[/yellow] {safe(summary.geometry_warning)}")
    out.print(
        f"trained {arch} on {summary.images} images: steps {summary.start_step} -> "
        f"{summary.final_step}, final loss {summary.final_loss:.4f}, {summary.seconds} s\n"
        f"model: {safe(summary.model)}"
    )


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
    threads: ThreadsOpt = None,
) -> None:
    """Generate images from a local model and save them as a PNG grid.

    Text-conditional pipelines generate from `--prompt` under classifier-free guidance
    (`--guidance-scale`, 1 = no guidance), as the diffusers text-to-image pipeline does.
    """
    apply_threads(threads)
    check_model(model, config=model_config, lora=lora, variant=variant)
    from diffcurate.models.diffusion import ModelLoadError
    from diffcurate.models.sample import generate, save_grid

    if sampler not in ("ddim", "ddpm"):
        raise fail(f"unknown --sampler {sampler!r}; use ddim or ddpm")
    try:
        options = load_options(variant, dtype, lora, lora_scale, model_config, device)
    except (ValidationError, ValueError) as e:
        raise fail(str(e)) from e
    loaded = preflight(model, options, device)
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
        raise fail(str(e)) from e
    path = save_grid(images, out_file, scale=scale)
    out.print(f"wrote {n} samples to {safe(path)}")
