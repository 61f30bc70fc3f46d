"""Re-trigger probes: caption embeddings near a secret's own caption that may reproduce it.

Why: pruning-based mitigations (removing neurons or weights that light up on a memorized
caption) can hide a memorized image from its exact caption while leaving it reachable from
nearby conditioning. "Finding Dori" (Kowalczuk et al., arXiv 2507.16880) re-triggers such
"fixed" models with small perturbations of the caption's text embedding and with a few
gradient steps on the embedding towards the memorized image. A gate that only prompts the
exact caption would pass such a model; this module builds the probes a gate should try too.

For a secret with caption states ``e`` (the text encoder's ``[seq, dim]`` output, what the
gate conditions on) and diffusion-space target ``x0`` (pixels, or VAE latents):

* **random probes**: ``e + sigma * ||e|| * n / ||n||`` with ``n`` keyed Gaussian noise, so the
  radius is relative to the embedding's own norm (text encoders differ in scale by orders of
  magnitude; a relative radius means the same thing for each);
* **an optimised probe**: ``e + delta`` after ``opt_steps`` normalised-gradient steps on
  ``delta`` that minimise the denoising loss of ``x0`` under conditioning ``e + delta``,
  ``E_{t, eps} || f(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, e + delta) - target ||^2``
  (:class:`~diffcurate.influence.objective.DiffusionObjective`: ε or v target as the model
  predicts), step s of length ``lr * ||e|| * (1 - s / opt_steps)`` and ``delta`` projected
  back onto the L2 ball of radius ``rho * ||e||``; the iterate (after at least one step) with
  the lowest loss on fixed evaluation draws is the probe. Normalised steps, because a
  memorization circuit that pruning has switched off can leave only a vanishing gradient at
  ``e`` (a saturated gate), where a plain gradient step barely moves; the step length is what
  the ball bounds anyway.

Every draw (the random directions, each step's (t, ε)) is keyed by ``(seed, secret id)``
(:mod:`diffcurate.keyed`), so the model before and after mitigation get the same random probes
and the same optimisation draws, and a probe does not depend on which other secrets are
measured. The conditional network prediction is differentiated without guidance (guidance
mixes in the unconditional prediction, which does not depend on ``delta``); generation from
the probes then uses the gate's own sampler and guidance (:mod:`diffcurate.curation.retrigger`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.keyed import keyed_generator
from diffcurate.models.diffusion import DiffusionModel

OPTIMISED = "optimised"
"""Label of the gradient-searched probe (random probes are ``random-<k>``)."""


class RetriggerConfig(BaseModel):
    """The re-trigger probe of the memorization gate (text-conditional models only).

    Attributes:
        enabled: Run the probe on text-conditional models (on by default: pruning-based
            fixes can be re-triggered, so the gate measures it; it costs ``random_probes + 1``
            times the plain Mem% generations, plus ``opt_steps`` forward and backward passes
            per secret). Unconditional models record "not applicable".
        random_probes: Random perturbations per secret.
        sigma: Radius of the random perturbations, relative to ``||e||``.
        opt_steps: Normalised-gradient steps of the optimised probe (0: no optimised probe).
        lr: Length of one step, relative to ``||e||``.
        rho: Radius of the ball the optimised perturbation is projected onto, relative to
            ``||e||``.
        draws: (t, ε) draws per step (t uniform over the training timesteps).
        generations_per_probe: Generations from each probed embedding.
        seed: Keys the random directions, the optimisation draws and the generations' noise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    random_probes: int = Field(4, ge=0)
    sigma: float = Field(0.05, ge=0.0)
    opt_steps: int = Field(10, ge=0)
    lr: float = Field(0.02, gt=0.0)
    rho: float = Field(0.1, ge=0.0)
    draws: int = Field(4, ge=1)
    generations_per_probe: int = Field(1, ge=1)
    seed: int = 0

    @property
    def labels(self) -> list[str]:
        """Probe labels in the order :func:`probe_embeddings` returns them."""
        labels = [f"random-{k}" for k in range(self.random_probes)]
        return [*labels, OPTIMISED] if self.opt_steps > 0 else labels


@dataclass(frozen=True)
class Probes:
    """The probed caption embeddings of a set of secrets.

    Attributes:
        embeddings: ``[S, P, seq, dim]``: secret s's probe p (labels in ``labels``).
        labels: ``P`` probe labels (``random-<k>``, then ``optimised``).
        loss_plain: Per secret, the denoising loss of its x0 under its own caption (on fixed
            evaluation draws), or None without an optimised probe.
        loss_optimised: The same loss under the optimised probe.
        relative_radius: Per secret and probe, ``||probe - e|| / ||e||``.
    """

    embeddings: torch.Tensor
    labels: list[str]
    loss_plain: list[float] | None
    loss_optimised: list[float] | None
    relative_radius: torch.Tensor


def random_directions(
    seed: int, key: str, n: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """``n`` keyed unit-norm Gaussian directions of ``shape`` (float64 draws, then cast)."""
    rows = [
        torch.randn(tuple(shape), generator=keyed_generator(seed, key, "retrigger-dir", k),
                    dtype=torch.float64)
        for k in range(n)
    ]  # fmt: skip
    if not rows:
        return torch.empty((0, *shape), dtype=dtype)
    dirs = torch.stack(rows)
    return (dirs / dirs.flatten(1).norm(dim=1).view(-1, *([1] * len(shape)))).to(dtype)


def probe_embeddings(
    model: DiffusionModel,
    x0: torch.Tensor,
    conditioning: torch.Tensor,
    secret_ids: Sequence[str],
    config: RetriggerConfig,
    device: str | torch.device = "cpu",
) -> Probes:
    """The re-trigger probes of every secret (see the module docstring).

    Args:
        model: A text-conditional model.
        x0: ``[S, *sample_shape]`` the secrets in diffusion space (VAE latents for a latent
            model, pixels otherwise), as :meth:`DiffusionObjective.encode` gives them.
        conditioning: ``[S, seq, dim]`` each secret's caption states.
        secret_ids: One id per secret (keys the draws).
        config: Probe settings.
        device: Where the optimisation runs.

    Returns:
        The probes, on the CPU in the conditioning's dtype.

    Raises:
        ValueError: An unconditional model, or mismatched shapes.
    """
    if not model.conditional:
        raise ValueError("re-trigger probes perturb caption embeddings: the model is not "
                         f"text-conditional ({type(model.unet).__name__})")  # fmt: skip
    if not (len(x0) == len(conditioning) == len(secret_ids)):
        raise ValueError(f"{len(x0)} secrets, {len(conditioning)} caption embeddings and "
                         f"{len(secret_ids)} ids")  # fmt: skip
    dtype = conditioning.dtype
    out, radius, plain_losses, opt_losses = [], [], [], []
    for i, sid in enumerate(secret_ids):
        e = conditioning[i].detach().cpu()
        norm = e.norm()
        dirs = random_directions(config.seed, str(sid), config.random_probes, e.shape, dtype)
        probes = [e + config.sigma * norm * d for d in dirs]
        if config.opt_steps > 0:
            delta, before, after = optimise_delta(model, x0[i], e, str(sid), config, device)
            probes.append(e + delta)
            plain_losses.append(before)
            opt_losses.append(after)
        stacked = torch.stack(probes) if probes else torch.empty((0, *e.shape), dtype=dtype)
        out.append(stacked)
        gap = (stacked - e).flatten(1).norm(dim=1) / norm if len(stacked) else torch.empty(0)
        radius.append(gap)
    have_opt = config.opt_steps > 0
    return Probes(
        embeddings=torch.stack(out),
        labels=config.labels,
        loss_plain=plain_losses if have_opt else None,
        loss_optimised=opt_losses if have_opt else None,
        relative_radius=torch.stack(radius),
    )


def optimise_delta(
    model: DiffusionModel,
    x0: torch.Tensor,
    e: torch.Tensor,
    key: str,
    config: RetriggerConfig,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, float, float]:
    """Search ``delta`` with ``||delta|| <= rho ||e||`` minimising the denoising loss of ``x0``.

    Args:
        model: A text-conditional model (its weights are not changed and get no gradients).
        x0: One secret in diffusion space, ``[*sample_shape]``.
        e: Its caption states ``[seq, dim]``.
        key: The secret's id (keys the draws).
        config: Probe settings.
        device: Where to run.

    Returns:
        ``delta`` (CPU, ``e``'s dtype), and the loss of ``x0`` under ``e`` and under
        ``e + delta`` on the same fixed evaluation draws.
    """
    device = torch.device(device)
    unet = model.unet.to(device).eval()
    wdtype = next(unet.parameters()).dtype
    n_train = int(model.scheduler.config.num_train_timesteps)
    objective = DiffusionObjective(
        model.scheduler,
        TimestepSchedule(band=(0, n_train), draws_per_sample=config.draws),
        seed=config.seed,
    )
    x = x0.to(device=device, dtype=wdtype)[None]
    base = e.to(device=device, dtype=wdtype)
    norm = float(base.norm())
    radius, step = config.rho * norm, config.lr * norm

    def loss_at(delta: torch.Tensor, stream: str) -> torch.Tensor:
        draws = objective.draws([f"{key}\x1fretrigger\x1f{stream}"], x.shape[1:], wdtype, device)
        batch = objective.expand(x, draws, (base + delta)[None])
        pred = objective.model_output(unet, batch.x_t, batch.t, batch.cond)
        return (pred - batch.target).pow(2).flatten(1).mean(1).mean()

    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        delta = torch.zeros_like(base)
        with torch.no_grad():
            before = float(loss_at(delta, "eval"))
        # The probe is a perturbation: the best iterate after at least one step, even when the
        # caption itself scores lower. Only a zero gradient (a prediction that ignores the
        # conditioning, or a saturated one) leaves delta = 0.
        best, after, stepped = delta, before, False
        for s in range(config.opt_steps):
            d = delta.detach().requires_grad_(True)
            loss = loss_at(d, f"step-{s}")
            if not loss.requires_grad:  # the prediction ignores the conditioning: nothing to do
                break
            (grad,) = torch.autograd.grad(loss, d)
            g_norm = grad.norm()
            if not torch.isfinite(g_norm) or g_norm == 0:
                break
            # Linearly decaying steps: fixed-length normalised steps would circle the optimum.
            delta = delta - step * (1 - s / config.opt_steps) * grad / g_norm
            size = delta.norm()
            if size > radius:
                delta = delta * (radius / size)
            with torch.no_grad():
                current = float(loss_at(delta, "eval"))
            if not stepped or current < after:
                best, after, stepped = delta, current, True
    finally:
        for p in params:
            p.requires_grad_(True)
    return best.detach().to(device="cpu", dtype=e.dtype), before, after
