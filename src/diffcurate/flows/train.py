"""The train flow: a reference diffusion model trained on an ingested dataset, with a ledger record.

Steps:
    1. Record the run in the ledger (closed with its statistics, or failed with the error).
    2. Build the architecture; a latent one first trains its VAE once per model directory.
    3. Load what the model consumes (pixels, or cached VAE latents and caption states).
    4. Train the UNet, resuming from the newest checkpoint of the same data and settings.

Like every flow, it is what the CLI (``diffcurate train``) and deployments call, so a training
run is orchestrated, recorded and retried the same way as scoring or hygiene.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.models.images import Geometry
from diffcurate.models.reference_training import prepare_reference_training
from diffcurate.models.schedule import SchedulerConfig
from diffcurate.models.train import TrainConfig
from diffcurate.models.train import train as train_model
from diffcurate.models.vae_train import VAEConfig
from diffcurate.storage.lance_store import DatasetName, LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.workspace import Workspace


class TrainParams(BaseModel):
    """Parameters of one training run (JSON-serialisable, for deployments too)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName = Field(description="Dataset to train on (as ingested).")
    name: DatasetName = Field(description="Model name under WORKSPACE/models.")
    arch: str = Field("digits-8px", description="Reference architecture.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    geometry: Geometry = "center-crop"
    train: TrainConfig = Field(default_factory=TrainConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    workspace: Path = Field(Path("workspace"), description="Workspace directory.")
    progress: bool = Field(True, description="Progress output of the VAE stage.")


class TrainSummary(BaseModel):
    """What a training run did; ``stats`` is what the ledger stores for it."""

    run_id: str
    arch: str
    images: int
    start_step: int
    final_step: int
    model: str
    final_loss: float
    geometry: dict
    geometry_warning: str | None = None
    vae_recon_rmse: float | None = None
    vae_seconds: float | None = None
    seconds: float

    @property
    def stats(self) -> dict:
        return self.model_dump(
            mode="json", exclude={"run_id", "arch", "geometry_warning", "vae_seconds"}
        )


@flow(name="train", validate_parameters=True)
def train_flow(params: TrainParams) -> TrainSummary:
    """Train a reference model (resumes if re-run); checkpoints under WORKSPACE/models/NAME."""
    started = time.perf_counter()
    layout = Workspace(params.workspace)
    ledger = Ledger(layout.ledger_path)
    model_dir = layout.model_dir(params.name)
    config = params.train
    run_params = {"name": params.name, "arch": params.arch,
                  "prediction": params.scheduler.prediction_type, "geometry": params.geometry,
                  "vae_steps": params.vae.steps, **config.model_dump()}  # fmt: skip
    with ledger.recording(
        "train", dataset=params.dataset, source=params.arch, params=run_params
    ) as run:
        data = prepare_reference_training(
            LanceStore.open(layout), params.dataset, params.arch, model_dir,
            seed=config.seed, scheduler=params.scheduler,
            vae=params.vae, geometry=params.geometry, progress=params.progress,
        )  # fmt: skip
        result = train_model(
            data.model, data.rows, config, checkpoint_dir=model_dir / "checkpoints",
            unconditional=data.unconditional,
        )  # fmt: skip
        tail = result.losses[-100:]
        summary = TrainSummary(
            run_id=run.run_id, arch=params.arch, images=len(data.sample_ids),
            start_step=result.start_step, final_step=result.final_step,
            model=str(result.checkpoint), final_loss=sum(tail) / max(len(tail), 1),
            geometry=data.geometry.model_dump(mode="json"),
            geometry_warning=data.geometry.warning(),
            vae_recon_rmse=None if data.vae is None else data.vae.recon_rmse,
            vae_seconds=None if data.vae is None else data.vae.seconds,
            seconds=round(time.perf_counter() - started, 1),
        )  # fmt: skip
        run.stats = lambda: summary.stats
    return summary
