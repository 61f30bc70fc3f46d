"""Calibrate the reconstruction threshold τ to a false-positive rate on images the model never saw.

Why: a fixed τ is tied to image size, content and feature space. Seed 000 (following Carlini et
al. 2023) does not use a fixed number either: its CLIP threshold is "a threshold that yields
< 0.1% false positives on a 100 000-image public validation set". This module implements that
rule for any closeness measure of :mod:`diffcurate.metrics.memorization`:

1. generate with the model exactly as for the secrets;
2. for every calibration image (ideally held out, i.e. never trained on) take its closest
   generation, as :func:`~diffcurate.metrics.memorization.mem_percent` does for a secret;
3. choose τ so that at most ``fpr`` of the calibration images would count as "reconstructed":
   with the closest values sorted from closest to farthest and ``m = floor(fpr × n)``, τ is the
   (m+1)-th value. A reconstruction is strictly closer than τ (``distance < τ``,
   ``similarity > τ``), so exactly the m closer images (fewer with ties at τ) are false
   positives.

τ is calibrated once, on the model BEFORE mitigation, and the same τ then judges the candidate
model: Mem% before and after must use one yardstick.

With n calibration images the smallest meaningful rate is 1/n, so ``fpr × n ≥ 1`` is required
(the seed's 0.1% needs ≥ 1,000 images). When no held-out images exist, kept training images
can stand in; they are members, so their closest generations are closer than a true
non-member's and τ comes out stricter (fewer secrets count as reconstructed).

Relative metrics (``relative_tiled_l2``, ``relative_l2``) calibrate δ the same way: a calibration
image's value is its ratio to its own closest generation, l(x̂, h; S_x̂), with S_x̂ drawn from the
training images (``neighbours``). Held-out images have no copies among them; stand-in training
images must name their own copies in ``exclude``, as secrets do.

:func:`false_positives` reports, for any τ (fixed, given or calibrated), how many calibration
images count as reconstructed: the held-out false-positive rate of the rule in force.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict

from diffcurate.metrics.memorization import Exclusion, MemorizationPolicy, pairwise_closeness


class Calibration(BaseModel):
    """A threshold calibrated to a false-positive rate.

    Attributes:
        tau: The calibrated threshold.
        fpr: The requested false-positive rate.
        observed_fpr: Share of calibration images strictly beyond τ (≤ ``fpr``).
        n_images: Calibration images used.
        n_generated: Generations they were compared with.
        metric: Closeness measure.
    """

    model_config = ConfigDict(frozen=True)

    tau: float
    fpr: float
    observed_fpr: float
    n_images: int
    n_generated: int
    metric: str


def closest_values(
    generated: ArrayLike,
    images: ArrayLike,
    policy: MemorizationPolicy,
    generated_for: Sequence[int] | None = None,
    neighbours: ArrayLike | None = None,
    exclude: Exclusion | None = None,
) -> np.ndarray:
    """Each image's closest generation under ``policy`` (min distance or max similarity).

    Args:
        generated: Generations (pixels in [0, 1] or embeddings, as for ``mem_percent``).
        images: Calibration images in the same form.
        policy: Closeness measure.
        generated_for: Conditional models: the calibration-image index each generation was
            prompted for; a generation then only counts for its own image.
        neighbours: Relative metrics: training images (pixels in [0, 1]) S is drawn from.
        exclude: Relative metrics: per calibration image, the neighbour rows that are its
            copies (stand-in training images; None for held-out images).
    """
    scores = pairwise_closeness(generated, images, policy, neighbours, exclude)
    if generated_for is not None:
        owner = np.asarray(generated_for)
        if owner.shape != (scores.shape[0],):
            raise ValueError(f"generated_for has {owner.size} entries for {scores.shape[0]} "
                             "generations")  # fmt: skip
        allowed = owner[:, None] == np.arange(scores.shape[1])[None, :]
        if not allowed.any(axis=0).all():
            raise ValueError("every calibration image needs at least one generation")
        fill = -np.inf if policy.higher_is_closer else np.inf
        scores = np.where(allowed, scores, fill)
    return scores.max(axis=0) if policy.higher_is_closer else scores.min(axis=0)


def calibrate_threshold(
    generated: ArrayLike,
    images: ArrayLike,
    policy: MemorizationPolicy,
    fpr: float,
    generated_for: Sequence[int] | None = None,
    neighbours: ArrayLike | None = None,
    exclude: Exclusion | None = None,
) -> Calibration:
    """τ such that at most ``fpr`` of ``images`` count as reconstructed by ``generated``.

    Arguments as for :func:`closest_values`; see :func:`threshold_at_fpr` for the rule.

    Raises:
        ValueError: ``fpr`` outside (0, 0.5], or fewer than 1/``fpr`` calibration images.
    """
    closest = closest_values(generated, images, policy, generated_for, neighbours, exclude)
    return threshold_at_fpr(closest, policy, fpr, n_generated=len(np.asarray(generated)))


def threshold_at_fpr(
    closest: np.ndarray, policy: MemorizationPolicy, fpr: float, n_generated: int
) -> Calibration:
    """τ from calibration images' closest values (:func:`closest_values`): the (m+1)-th closest,
    ``m = floor(fpr × n)``, so that at most ``fpr`` of them lie strictly beyond it.

    Raises:
        ValueError: ``fpr`` outside (0, 0.5], or fewer than 1/``fpr`` values.
    """
    if not 0.0 < fpr <= 0.5:
        raise ValueError(f"fpr must be in (0, 0.5], got {fpr}")
    n = len(closest)
    if n * fpr < 1.0 - 1e-9:
        raise ValueError(f"calibrating to a false-positive rate of {fpr:g} needs at least "
                         f"{math.ceil(1 / fpr - 1e-9)} calibration images, got {n}")  # fmt: skip
    m = math.floor(n * fpr + 1e-9)
    ordered = np.sort(closest)[::-1] if policy.higher_is_closer else np.sort(closest)
    tau = float(ordered[m])
    return Calibration(
        tau=tau,
        fpr=fpr,
        observed_fpr=false_positives(closest, policy, tau) / n,
        n_images=n,
        n_generated=n_generated,
        metric=policy.metric,
    )


def false_positives(closest: np.ndarray, policy: MemorizationPolicy, tau: float) -> int:
    """How many calibration images count as reconstructed at ``tau`` (strictly beyond it)."""
    values = np.asarray(closest)
    return int((values > tau).sum() if policy.higher_is_closer else (values < tau).sum())
