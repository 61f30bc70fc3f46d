"""The optimisation loop every fine-tune-style mitigation shares.

Why one loop: the methods differ only in the gradient of one step (plain retain loss, a frozen
subset, a retain term plus a forgetting term), while batching, keyed randomness, warm-up,
clipping, the compute count and the progress bar are the same. The retain stream draws its
batches, timesteps, noise and caption dropout exactly as :func:`diffcurate.models.train.train`
does, so a plain fine-tune here is bit-identical to continued training; the forget stream has
its own keys, so adding it does not move the retain draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.keyed import keyed_generator
from diffcurate.mitigation.base import (
    MitigationConfig,
    MitigationData,
    MitigationResult,
    copy_of,
)
from diffcurate.mitigation.captions import perturb_captions
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.train import batch_indices, progress_bar

GRAD_CLIP = 1.0
"""Global gradient-norm clip, as :class:`~diffcurate.models.train.TrainConfig`'s default."""


@dataclass(frozen=True)
class Batch:
    """One step's draws: clean inputs, timesteps, noise and conditioning."""

    x0: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    cond: torch.Tensor | None


StepFn = Callable[["FineTuneLoop", int], tuple[float, float | None]]
"""Fills the trainable parameters' ``.grad`` for step k; returns (retain loss, forget loss)."""


class FineTuneLoop:
    """Keyed batches, loss evaluation and the AdamW loop over a candidate's UNet.

    Args:
        candidate: The model to update in place (a copy of the released one).
        data: The pruned split.
        config: Batch sizes, caption-side settings, seed, device.
        trainable: Parameter names to update; None = all. The others are frozen
            (``requires_grad`` off during the run, restored afterwards).
    """

    def __init__(
        self,
        candidate: DiffusionModel,
        data: MitigationData,
        config: MitigationConfig,
        trainable: Sequence[str] | None = None,
    ) -> None:
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device is 'cuda' but no CUDA device is available")
        if candidate.conditional != data.retain.conditional:
            need = "needs" if candidate.conditional else "takes no"
            raise ValueError(f"{type(candidate.unet).__name__} {need} caption states")
        self.model, self.data, self.config = candidate, data, config
        self.device = torch.device(config.device)
        self.unet = candidate.unet.to(self.device)
        self.dtype = next(self.unet.parameters()).dtype
        self.n_train = int(candidate.scheduler.config.num_train_timesteps)
        self.objective = DiffusionObjective(
            candidate.scheduler, TimestepSchedule(band=(0, self.n_train)), seed=config.seed
        )
        named = dict(self.unet.named_parameters())
        names = list(named) if trainable is None else list(trainable)
        unknown = set(names) - set(named)
        if unknown:
            raise ValueError(f"no such parameters: {sorted(unknown)[:3]}")
        if not names:
            raise ValueError("nothing to train: no trainable parameters selected")
        self.trainable = None if trainable is None else tuple(names)
        self.params = {n: named[n] for n in named if n in set(names)}
        self._requires = {n: p.requires_grad for n, p in named.items()}
        for n, p in named.items():
            p.requires_grad_(n in self.params)
        self.sample_passes = 0
        self.detail: dict[str, object] = {}

    # ------------------------------------------------------------------------------ draws
    def retain_batch(self, step: int) -> Batch:
        """Step ``step``'s kept-sample batch, drawn exactly as ``train`` draws it."""
        cfg, data = self.config, self.data
        idx = batch_indices(len(data.retain), cfg.batch_size, cfg.seed, step)
        gen = keyed_generator(cfg.seed, "train", "noise", step)
        t = torch.randint(0, self.n_train, (cfg.batch_size,), generator=gen)
        eps = torch.randn((cfg.batch_size, *self.model.sample_shape), generator=gen)
        x0, cond = data.retain.batch(idx)
        if cond is not None:
            cond = perturb_captions(cond, cfg.caption_noise, cfg.caption_replace, cfg.seed, step)
            if cfg.caption_dropout > 0 and data.unconditional is not None:
                drop_gen = keyed_generator(cfg.seed, "train", "caption-dropout", step)
                drop = torch.rand(cfg.batch_size, generator=drop_gen) < cfg.caption_dropout
                uncond = data.unconditional.reshape(1, *cond.shape[1:]).to(cond)
                cond = torch.where(drop[:, None, None], uncond, cond)
        return self._on_device(x0, t, eps, cond)

    def forget_batch(self, step: int) -> Batch:
        """Step ``step``'s removed-sample batch (its own keyed stream; captions as they are)."""
        cfg, data = self.config, self.data
        if data.forget is None or len(data.forget) == 0:
            raise ValueError("this method needs the removed samples (forget set)")
        size = cfg.forget_batch_size
        idx = batch_indices(len(data.forget), size, cfg.seed, step, stream="forget")
        gen = keyed_generator(cfg.seed, "forget", "noise", step)
        t = torch.randint(0, self.n_train, (size,), generator=gen)
        eps = torch.randn((size, *self.model.sample_shape), generator=gen)
        x0, cond = data.forget.batch(idx)
        return self._on_device(x0, t, eps, cond)

    def _on_device(self, x0, t, eps, cond) -> Batch:
        kw = dict(device=self.device, dtype=self.dtype)
        return Batch(
            x0.to(**kw), t.to(self.device), eps.to(**kw), None if cond is None else cond.to(**kw)
        )

    # ------------------------------------------------------------------------------- loss
    def output(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's prediction on the batch's noisy inputs (with ``params`` substituted)."""
        x_t = self.objective.noisy(batch.x0, batch.t, batch.eps)
        kwargs = {} if batch.cond is None else {"encoder_hidden_states": batch.cond}
        self.sample_passes += len(batch.x0)
        if params is None:
            return self.unet(x_t, batch.t, **kwargs).sample
        return torch.func.functional_call(self.unet, params, (x_t, batch.t), kwargs).sample

    def loss(
        self,
        batch: Batch,
        target: torch.Tensor | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean squared error against ``target`` (default: the diffusion target of the batch)."""
        if target is None:
            target = self.objective.target(batch.x0, batch.t, batch.eps)
        return F.mse_loss(self.output(batch, params).float(), target.float())

    def grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of ``loss`` with respect to the trainable parameters (their order)."""
        return list(torch.autograd.grad(loss, list(self.params.values())))

    def set_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Install ``grads`` as the trainable parameters' ``.grad``."""
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g.detach().to(p.dtype)

    def retain_step(self, step: int) -> tuple[float, None]:
        """Plain fine-tune gradient: the diffusion loss on the kept batch."""
        loss = self.loss(self.retain_batch(step))
        loss.backward()
        return float(loss.detach()), None

    # ------------------------------------------------------------------------------- loop
    def run(
        self, name: str, steps: int, lr: float, step_fn: StepFn, progress: bool = False
    ) -> MitigationResult:
        """``steps`` AdamW steps of ``step_fn``'s gradient with warm-up and clipping."""
        started = time.perf_counter()
        cfg = self.config
        optimizer = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=0.0)
        losses: list[float] = []
        forget_losses: list[float] = []
        bar = progress_bar(progress, steps, label=name)
        self.unet.train()
        try:
            if bar is not None:
                bar.start()
            for step in range(steps):
                if cfg.warmup_steps:
                    for group in optimizer.param_groups:
                        group["lr"] = lr * min(1.0, (step + 1) / cfg.warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                retain, forget = step_fn(self, step)
                if not math.isfinite(retain) or (forget is not None and not math.isfinite(forget)):
                    raise FloatingPointError(f"{name}: retain loss is {retain} at step {step}")
                torch.nn.utils.clip_grad_norm_(self.params.values(), GRAD_CLIP)
                optimizer.step()
                losses.append(retain)
                if forget is not None:
                    forget_losses.append(forget)
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=step + 1, loss=retain)
        finally:
            if bar is not None:
                bar.stop()
            self.unet.eval()
            for n, p in self.unet.named_parameters():
                p.requires_grad_(self._requires[n])
        return MitigationResult(
            method=name,
            losses=losses,
            forget_losses=forget_losses,
            steps=steps,
            sample_passes=self.sample_passes,
            seconds=time.perf_counter() - started,
            trainable=self.trainable,
            detail=dict(self.detail),
        )


class LoopMitigation:
    """A mitigation that is one :class:`FineTuneLoop` run over a copy of the model.

    Subclasses name themselves and give the per-step gradient (``step``); those that train a
    subset of the parameters override :meth:`prepare`.
    """

    name: str
    needs_forget: bool
    summary: str

    def step(self, loop: FineTuneLoop, step: int) -> tuple[float, float | None]:
        """Fill the trainable parameters' ``.grad`` for one step (default: the retain loss)."""
        return loop.retain_step(step)

    def prepare(
        self, model: DiffusionModel, candidate: DiffusionModel, data: MitigationData,
        config: MitigationConfig,
    ) -> FineTuneLoop:  # fmt: skip
        """The loop over ``candidate`` (default: every parameter trained)."""
        return FineTuneLoop(candidate, data, config)

    def steps_for(self, config: MitigationConfig, n_retain: int) -> int:
        return config.fine_tune_steps(n_retain)

    def run(
        self, model: DiffusionModel, data: MitigationData, config: MitigationConfig, progress: bool
    ) -> tuple[DiffusionModel, MitigationResult]:
        candidate = copy_of(model)
        loop = self.prepare(model, candidate, data, config)
        steps = self.steps_for(config, len(data.retain))
        return candidate, loop.run(self.name, steps, config.lr, self.step, progress)
