"""Re-trigger Mem%: the share of secrets that some perturbed caption embedding reproduces.

Plain Mem% (:mod:`diffcurate.metrics.memorization`) prompts each secret's exact caption. A
mitigation that prunes the weights a memorized caption activates can drive that to 0 while the
image stays one small step away in embedding space ("Finding Dori", arXiv 2507.16880); the
probes that take that step are built by :mod:`diffcurate.models.retrigger`. Here generations
from those probes are judged with exactly the rule and τ of plain Mem% (a generation only
counts for the secret whose caption it was probed from), and a secret is **re-triggered** when
any probe's generation reconstructs it. The exact caption is not one of the probes: the
re-trigger Mem% answers "what does a small perturbation recover", next to the plain Mem%.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, computed_field

from diffcurate.metrics.memorization import Exclusion, MemorizationPolicy, pairwise_closeness


class SecretRetrigger(BaseModel):
    """One secret's re-trigger outcome.

    Attributes:
        secret_id: The secret.
        retriggered: Some probe's generation reconstructs it.
        probes: Probe labels that reconstruct it (``random-<k>``, ``optimised``).
        best_probe: The probe whose generation came closest.
        best_value: That generation's distance (or similarity) under the rule in force.
        n_generations: Generations judged for this secret.
        loss_plain: Denoising loss of the secret under its caption (optimised probe only).
        loss_optimised: The same under the optimised probe: how far the search got.
    """

    model_config = ConfigDict(frozen=True)

    secret_id: str
    retriggered: bool
    probes: list[str]
    best_probe: str | None
    best_value: float | None
    n_generations: int
    loss_plain: float | None = None
    loss_optimised: float | None = None


class RetriggerResult(BaseModel):
    """Re-trigger Mem% of one model on one secret set, or why it was not measured.

    Attributes:
        skipped: Why no probe ran (e.g. an unconditional model has no caption to perturb);
            None when measured.
        metric: Reconstruction metric (the plain Mem%'s).
        threshold: τ used (the plain Mem%'s).
        n_secrets: Secrets probed.
        n_retriggered: Secrets some probe reproduces.
        probes: Probe labels per secret.
        secrets: Per-secret details, in input order.
        seconds: Wall time of the probe (search and generation).
    """

    model_config = ConfigDict(frozen=True)

    skipped: str | None = None
    metric: str | None = None
    threshold: float | None = None
    n_secrets: int = 0
    n_retriggered: int = 0
    probes: list[str] = []
    secrets: list[SecretRetrigger] = []
    seconds: float | None = None

    @computed_field
    @property
    def mem_percent(self) -> float | None:
        """``100 * n_retriggered / n_secrets``; None when skipped."""
        if self.skipped is not None or self.n_secrets == 0:
            return None
        return 100.0 * self.n_retriggered / self.n_secrets


def retrigger_percent(
    generated: ArrayLike,
    secrets: ArrayLike,
    *,
    secret_ids: Sequence[str],
    generated_for: Sequence[str],
    probe_of: Sequence[str],
    policy: MemorizationPolicy,
    neighbours: ArrayLike | None = None,
    exclude: Exclusion | None = None,
    loss_plain: Sequence[float] | None = None,
    loss_optimised: Sequence[float] | None = None,
) -> RetriggerResult:
    """Judge probe generations with the plain Mem% rule.

    Args:
        generated: Generations from the probes, ``[n, H, W(, C)]`` in [0, 1].
        secrets: The secrets, same form.
        secret_ids: One unique id per secret.
        generated_for: Per generation, the secret whose caption was probed.
        probe_of: Per generation, its probe's label.
        policy: The rule and τ of the plain Mem% (relative rules need ``neighbours``).
        neighbours: Relative rules: training images S is drawn from.
        exclude: Relative rules: per secret, the neighbour rows that are its copies.
        loss_plain: Per secret, the loss under its caption (optimised probe only).
        loss_optimised: Per secret, the loss under its optimised probe.

    Returns:
        Re-trigger Mem% with per-secret details.
    """
    ids = [str(s) for s in secret_ids]
    owners = np.asarray([str(s) for s in generated_for])
    labels = [str(p) for p in probe_of]
    n_gen = len(np.asarray(generated))
    if len(owners) != n_gen or len(labels) != n_gen:
        raise ValueError(f"{n_gen} generations, {len(owners)} owners, {len(labels)} probe labels")
    if len(set(ids)) != len(ids):
        raise ValueError("secret_ids must be unique")
    unknown = sorted(set(owners.tolist()) - set(ids))
    if unknown:
        raise ValueError(f"generated_for names unknown secrets: {unknown[:10]}")
    scores = pairwise_closeness(generated, secrets, policy, neighbours, exclude)
    tau = policy.tau
    hits = scores > tau if policy.higher_is_closer else scores < tau
    details = []
    for j, sid in enumerate(ids):
        rows = np.flatnonzero(owners == sid)
        best_probe = best_value = None
        if rows.size:
            col = scores[rows, j]
            k = int(np.argmax(col) if policy.higher_is_closer else np.argmin(col))
            best_probe, best_value = labels[rows[k]], float(col[k])
        hit_rows = rows[hits[rows, j]]
        found = list(dict.fromkeys(labels[r] for r in hit_rows))
        details.append(
            SecretRetrigger(
                secret_id=sid, retriggered=bool(found), probes=found, best_probe=best_probe,
                best_value=best_value, n_generations=int(rows.size),
                loss_plain=None if loss_plain is None else float(loss_plain[j]),
                loss_optimised=None if loss_optimised is None else float(loss_optimised[j]),
            )
        )  # fmt: skip
    return RetriggerResult(
        metric=policy.metric,
        threshold=tau,
        n_secrets=len(ids),
        n_retriggered=sum(d.retriggered for d in details),
        probes=list(dict.fromkeys(labels)),
        secrets=details,
    )
