"""The gate's re-trigger probe: Mem% from perturbed caption embeddings (text-conditional models).

Why the gate needs it: a mitigation that prunes what a memorized caption activates can pass a
plain Mem% gate while the image remains reachable from slightly perturbed conditioning ("Finding
Dori", arXiv 2507.16880). For each secret this builds the probes of
:mod:`diffcurate.models.retrigger` (random perturbations of relative radius ``sigma`` and a few
normalised-gradient steps towards the secret inside radius ``rho``), generates from each probe
with the gate's own sampler, DDIM steps and classifier-free guidance, and judges the generations
with the plain Mem%'s rule and τ (:mod:`diffcurate.metrics.retrigger`). Unconditional models have
no caption to perturb: the result then says so (``skipped``) instead of a number.
"""

from __future__ import annotations

import time

import torch

from diffcurate.curation.measure import MeasureConfig, to_unit
from diffcurate.metrics.memorization import Exclusion, MemorizationPolicy
from diffcurate.metrics.retrigger import RetriggerResult, retrigger_percent
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.inputs import encode_pixels
from diffcurate.models.retrigger import probe_embeddings
from diffcurate.models.sample import generate

UNCONDITIONAL_SKIP = "unconditional model: no caption embedding to perturb"


def measure_retrigger(
    model: DiffusionModel,
    secrets: torch.Tensor,
    secret_ids: list[str],
    secret_conditioning: torch.Tensor | None,
    config: MeasureConfig,
    policy: MemorizationPolicy,
    *,
    unconditional: torch.Tensor | None = None,
    neighbours: torch.Tensor | None = None,
    neighbour_copies: Exclusion | None = None,
) -> RetriggerResult:
    """Re-trigger Mem% of ``model`` on ``secrets``.

    Args:
        model: The model to probe.
        secrets: ``[S, C, H, W]`` distinct secrets in [-1, 1].
        secret_ids: One unique id per secret.
        secret_conditioning: ``[S, seq, dim]`` their caption states (None: unconditional).
        config: The gate's measurement settings (``config.retrigger`` the probe's; sampler
            steps, guidance and device are shared with plain Mem%).
        policy: The rule and τ that judged plain Mem% (with τ set: calibrated or fixed).
        unconditional: The empty caption's states, for guidance (required unless
            ``guidance_scale`` is 1).
        neighbours: Relative rules: training images ``[N, C, H, W]`` in [-1, 1].
        neighbour_copies: Relative rules: per secret, its copies among ``neighbours``.

    Returns:
        The result, ``skipped`` with the reason for an unconditional model.
    """
    if not model.conditional:
        return RetriggerResult(skipped=UNCONDITIONAL_SKIP)
    if secret_conditioning is None:
        raise ValueError("a text-conditional model is probed from caption embeddings")
    started = time.perf_counter()
    rt = config.retrigger
    x0 = encode_pixels(model, secrets)
    probes = probe_embeddings(model, x0, secret_conditioning, secret_ids, rt, config.device)
    n_sec, n_probe = probes.embeddings.shape[:2]
    if n_probe == 0:
        raise ValueError("the re-trigger probe has no probes: set random_probes or opt_steps")
    g = rt.generations_per_probe
    cond = probes.embeddings.flatten(0, 1).repeat_interleave(g, dim=0)  # [S*P*g, seq, dim]
    gens = generate(model, len(cond), seed=rt.seed, num_inference_steps=config.inference_steps,
                    conditioning=cond, guidance_scale=config.guidance_scale,
                    unconditional=unconditional, device=config.device)  # fmt: skip
    owners = [sid for sid in secret_ids for _ in range(n_probe * g)]
    labels = [lab for _ in secret_ids for lab in probes.labels for _ in range(g)]
    result = retrigger_percent(
        to_unit(gens), to_unit(secrets), secret_ids=secret_ids, generated_for=owners,
        probe_of=labels, policy=policy,
        neighbours=None if neighbours is None or not policy.relative else to_unit(neighbours),
        exclude=neighbour_copies if policy.relative else None,
        loss_plain=probes.loss_plain, loss_optimised=probes.loss_optimised,
    )  # fmt: skip
    assert result.n_secrets == n_sec
    return result.model_copy(update={"seconds": round(time.perf_counter() - started, 3)})
