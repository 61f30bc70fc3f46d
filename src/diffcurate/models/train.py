"""DDPM training on CPU or GPU: deterministic under a seed and resumable from checkpoints.

Loss: ``t ~ U{0, …, T-1}``, ``ε ~ N(0, I)``, ``loss = MSE(f(x_t, t), y)`` with ``x_t`` and the
target ``y`` (ε or v, from the scheduler's ``prediction_type``) computed by
:class:`~diffcurate.influence.objective.DiffusionObjective`, the project's single definition of
the diffusion loss. Optimiser: AdamW, optional gradient-norm clipping.

Why every random draw is keyed by the step number: the minibatch, the timesteps and the noise of
step k come from generators seeded by ``(seed, k)`` (and the data order of epoch e by
``(seed, e)``), never from one long-running RNG stream. Resuming at step k therefore needs no
generator state to reproduce the remaining draws exactly, and the global torch RNG (saved and
restored anyway, for dropout) is untouched by the draws. Together with the saved AdamW state
this makes "train to k, stop, resume to n" give the same weights as "train to n" bit for bit on
the same device and thread count.

Latent text-to-image models train on what their UNet consumes: VAE latents (computed once,
:mod:`diffcurate.models.inputs`) and the text encoder's caption states; the VAE and the text
encoder stay frozen, as in Stable Diffusion training. With ``caption_dropout`` p, each training
row's caption is replaced by the empty caption with probability p (keyed by step), which is what
makes classifier-free guidance possible at sampling time (SD trains with p = 0.1).

Checkpoints are complete diffusers model directories (``step-00000100/unet``, ``scheduler``,
and for text-to-image pipelines ``vae``, ``text_encoder``, ``tokenizer``, ``model_index.json``)
plus ``training_state.pt``, written to a temporary directory and renamed into place, so a run
killed mid-save leaves the previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.keyed import keyed_generator
from diffcurate.models.diffusion import DiffusionModel, load_diffusion_model, save_diffusion_model
from diffcurate.models.training_data import TrainingData, as_training_data

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
_CHECKPOINT_DIR = re.compile(r"^step-(\d{8})$")
# Changing these between a checkpoint and its resumption would change the trajectory.
_TRAJECTORY_FIELDS = (
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "grad_clip",
    "caption_dropout",
    "warmup_steps",
)


class TrainConfig(BaseModel):
    """How to train.

    Attributes:
        steps: Total optimiser steps (a resumed run continues up to this many).
        batch_size: Images per step. Batches walk through seeded per-epoch permutations of the
            data, so every image is seen equally often (what memorization by duplication
            relies on).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW decoupled weight decay; 0 by default, as regularisation would work
            against the memorization experiments these models exist for.
        seed: Seeds data order, timesteps and noise (initial weights are the model's own).
        log_every: Log the mean loss every this many steps (0: never).
        checkpoint_every: Save a checkpoint every this many steps (the final step is always
            saved when a checkpoint directory is given); None: only the final one.
        keep_checkpoints: How many of the most recent checkpoints to keep.
        grad_clip: Clip the global gradient norm to this (None: no clipping).
        caption_dropout: Probability that a row's caption is replaced by the empty caption
            (text-conditional models; needs the unconditional states). 0 disables it.
        warmup_steps: Linear learning-rate warm-up from 0 over this many steps (0: none).
        device: ``cpu`` or ``cuda``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    log_every: int = Field(100, ge=0)
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(0, ge=0)
    device: Literal["cpu", "cuda"] = "cpu"


@dataclass
class TrainResult:
    """What a :func:`train` call did.

    Attributes:
        losses: Loss of every step from step 0 (steps before a resumed checkpoint come from it).
        seconds: Wall time of this call.
        start_step: The step this call started at (0, or the resumed checkpoint's step).
        final_step: Steps completed when this call returned.
        checkpoint: The last checkpoint directory written or resumed from, if any.
    """

    losses: list[float]
    seconds: float
    start_step: int
    final_step: int
    checkpoint: Path | None = None

    @property
    def steps_per_second(self) -> float:
        """Training speed of this call (steps run here / wall time)."""
        ran = self.final_step - self.start_step
        return ran / self.seconds if self.seconds > 0 else float("nan")


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoint_dir`` (None if none)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_DIR.match(p.name)) and (p / TRAINING_STATE).is_file()
    ]
    return max(found)[1] if found else None


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int, stream: str = "train") -> torch.Tensor:
    """The data order of one epoch (cached: consecutive steps share an epoch)."""
    return torch.randperm(n, generator=keyed_generator(seed, stream, "epoch", epoch))


def batch_indices(
    n: int, batch_size: int, seed: int, step: int, stream: str = "train"
) -> torch.Tensor:
    """Indices of step ``step``'s batch: positions ``[step*B, (step+1)*B)`` of the epoch
    sequence, where epoch e is a permutation of ``range(n)`` seeded by ``(seed, stream, e)``.

    Shared with the mitigation loops, whose retain set walks the ``"train"`` stream exactly as
    :func:`train` does and whose forget set walks a stream of its own.
    """
    positions = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack(
        [_epoch_permutation(n, seed, pos // n, stream)[pos % n] for pos in positions]
    )


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    return batch_indices(n, batch_size, seed, step)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(
    root: Path, step: int, model: DiffusionModel, state: dict[str, Any], keep: int
) -> Path:
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_diffusion_model(
        DiffusionModel(unet=model.unet, scheduler=model.scheduler, vae=model.vae,
                       text_encoder=model.text_encoder),
        tmp,
    )  # fmt: skip
    torch.save(state, tmp / TRAINING_STATE)
    if final.exists():  # a stale, state-less leftover of a crash between save and rename
        shutil.rmtree(final)
    os.replace(tmp, final)
    complete = sorted(
        p for p in root.iterdir() if _CHECKPOINT_DIR.match(p.name) and (p / TRAINING_STATE).exists()
    )
    for old in complete[:-keep]:
        shutil.rmtree(old)
    return final


def _same_data(saved: str, fingerprint: str, data: TrainingData, *extra: Any) -> bool:
    """Whether a checkpoint's data fingerprint names ``data``: its own fingerprint or, for a
    checkpoint written by a run on in-memory tensors, the tensors' hash recomputed from the
    streamed rows (one pass, only on a mismatch)."""
    if saved == fingerprint:
        return True
    as_tensors = getattr(data, "tensor_fingerprint", None)
    return as_tensors is not None and saved == as_tensors(*extra)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, same_data: bool, ck: Path) -> None:
    defaults = TrainConfig(steps=1).model_dump()  # fields older checkpoints did not record
    changed = [
        f"{name}: {saved['config'].get(name, defaults[name])!r} -> {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if saved["config"].get(name, defaults[name]) != getattr(config, name)
    ]
    if changed:
        raise ValueError(f"cannot resume from {ck}: config changed ({'; '.join(changed)})")
    if not same_data:
        raise ValueError(f"cannot resume from {ck}: it was trained on different images")


def progress_bar(enabled: bool, total: int, completed: int = 0, label: str = "train") -> Any:
    """A rich progress bar (steps and loss) on stderr when it is an interactive terminal, else
    None; shared by every training loop."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.add_task(label, total=total, completed=completed, loss=float("nan"))
    return bar


def train(
    model: DiffusionModel,
    images: torch.Tensor | TrainingData,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    conditioning: torch.Tensor | None = None,
    unconditional: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model.unet`` in place with the DDPM objective.

    Args:
        model: The model; its scheduler defines T and ε/v prediction. A latent model's VAE and
            text encoder are not trained.
        images: ``x0`` in diffusion space, ``[N, *model.sample_shape]``: pixels in [-1, 1] for
            pixel-space models, VAE latents for latent models (both from
            :func:`diffcurate.models.inputs.load_inputs`). Kept where they are; each batch is
            moved to the device and cast to the model's dtype. Or a
            :class:`~diffcurate.models.training_data.TrainingData` that hands out each step's
            rows (and their caption states) on demand, e.g. streamed from LanceDB; the same
            rows give the same weights either way.
        config: Training settings.
        checkpoint_dir: Where checkpoints go. If it holds one already, training resumes from
            the latest (its weights replace ``model.unet``'s) after checking the data and the
            trajectory-defining settings are unchanged.
        progress: Show a rich progress bar when stderr is a terminal.
        conditioning: ``encoder_hidden_states`` ``[N, seq, dim]`` aligned with ``images``;
            required for ``UNet2DConditionModel``, refused otherwise. Part of ``images``
            when that is a ``TrainingData``.
        unconditional: The empty caption's states ``[1, seq, dim]``; required when
            ``config.caption_dropout`` > 0.

    Returns:
        A :class:`TrainResult`; the model is left in eval mode.

    Raises:
        ValueError: Shapes or conditioning do not fit the model, or a checkpoint cannot be
            resumed with this data/config.
        FloatingPointError: The loss became NaN or infinite (the last checkpoint survives).
    """
    started = time.perf_counter()
    data = as_training_data(images, conditioning)
    if tuple(data.sample_shape) != model.sample_shape:
        space = "latents" if model.vae is not None else "images"
        raise ValueError(
            f"{space} have shape {(len(data), *data.sample_shape)}, model expects "
            f"[N, {model.sample_shape}]"
        )
    if model.conditional != data.conditional:
        need = "needs" if model.conditional else "takes no"
        raise ValueError(f"{type(model.unet).__name__} {need} conditioning")
    if config.caption_dropout > 0 and (not data.conditional or unconditional is None):
        raise ValueError("caption_dropout needs conditioning and the unconditional states")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available")
    device = torch.device(config.device)
    n_train = int(model.scheduler.config.num_train_timesteps)
    objective = DiffusionObjective(
        model.scheduler, TimestepSchedule(band=(0, n_train)), seed=config.seed
    )
    unet = model.unet.to(device)
    dtype = next(unet.parameters()).dtype  # float64 models train in float64
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    dropout_uncond = unconditional if config.caption_dropout > 0 else None
    fingerprint = data.fingerprint(dropout_uncond)

    start, losses, last_ck = 0, [], None
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if root is not None and (ck := latest_checkpoint(root)) is not None:
        saved = torch.load(ck / TRAINING_STATE, map_location="cpu", weights_only=True)
        same = _same_data(saved["fingerprint"], fingerprint, data, dropout_uncond)
        _check_resumable(saved, config, same, ck)
        unet.load_state_dict(load_diffusion_model(ck, device=device).unet.state_dict())
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], device)
        start, losses, last_ck = int(saved["step"]), list(saved["losses"]), ck
        log.info("resuming training from %s (step %d)", ck, start)
        if start >= config.steps:
            log.warning("checkpoint %s is at step %d >= steps=%d", ck, start, config.steps)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)

    bar = progress_bar(progress, config.steps, start)
    unet.train()
    try:
        if bar is not None:
            bar.start()
        for step in range(start, config.steps):
            idx = _batch_indices(len(data), config.batch_size, config.seed, step)
            rows, cond = data.batch(idx)
            gen = keyed_generator(config.seed, "train", "noise", step)
            t = torch.randint(0, n_train, (config.batch_size,), generator=gen)
            eps = torch.randn((config.batch_size, *model.sample_shape), generator=gen)
            x0 = rows.to(device=device, dtype=dtype)
            eps, t = eps.to(device=device, dtype=dtype), t.to(device)
            kwargs = {}
            if cond is not None:
                if dropout_uncond is not None:
                    if tuple(dropout_uncond.shape[-2:]) != tuple(cond.shape[-2:]):
                        raise ValueError("unconditional states must have the conditioning's "
                                         "[seq, dim]")  # fmt: skip
                    drop_gen = keyed_generator(config.seed, "train", "caption-dropout", step)
                    drop = (
                        torch.rand(config.batch_size, generator=drop_gen) < config.caption_dropout
                    )
                    cond = torch.where(
                        drop[:, None, None],
                        dropout_uncond.reshape(1, *cond.shape[1:]).to(cond),
                        cond,
                    )
                kwargs["encoder_hidden_states"] = cond.to(device=device, dtype=dtype)
            if config.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
            out = unet(objective.noisy(x0, t, eps), t, **kwargs).sample
            loss = F.mse_loss(out.float(), objective.target(x0, t, eps).float())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; last checkpoint: {last_ck}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            done = step + 1
            if config.log_every and done % config.log_every == 0:
                recent = losses[-config.log_every :]
                log.info("step %d/%d loss %.5f", done, config.steps, sum(recent) / len(recent))
            if bar is not None:
                bar.update(bar.task_ids[0], completed=done, loss=losses[-1])
            periodic = config.checkpoint_every is not None and done % config.checkpoint_every == 0
            if root is not None and (periodic or done == config.steps):
                state = {
                    "step": done,
                    "losses": losses,
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(device),
                    "config": config.model_dump(),
                    "fingerprint": fingerprint,
                }
                last_ck = _save_checkpoint(root, done, model, state, config.keep_checkpoints)
    finally:
        if bar is not None:
            bar.stop()
        unet.eval()
    return TrainResult(
        losses=losses,
        seconds=time.perf_counter() - started,
        start_step=start,
        final_step=max(start, config.steps),
        checkpoint=last_ck,
    )
