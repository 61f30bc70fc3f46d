"""Linear Datamodelling Score (LDS): does an attribution method predict retraining outcomes?

Definition (seed 001 §4, eq. 13, after Park et al. 2023). Draw M random subsets S_1 … S_M of
the training set, each holding a fraction α (0.5) of it, sampled without replacement. Retrain
the model on each subset with K seeds and measure the query z under every retrained model; the
"oracle" target of subset m is the seed average ``f[m, q] = (1/K) Σ_k m(θ̃_k*(S_m), z_q)``. An
attribution method predicts the same quantity additively: the group attribution of subset m is

    g_m(q) = Σ_{i ∈ S_m} τ[q, i],

and the LDS of query q is the Spearman rank correlation over the M subsets between
``(g_m(q))_m`` and ``(f[m, q])_m``. The benchmark's LDS is the mean over queries (reported with
its standard error over queries).

Why additive and why ranks: a datamodel only has to order the subsets correctly (the absolute
scale of influence scores, e.g. kronfluence's missing 1/N, is irrelevant to Spearman), and the
sum over the *kept* samples ranks the subsets exactly as minus the sum over the *removed* ones
(they differ by the constant Σ_i τ[q, i]), so "predicted effect of training on S_m" and
"predicted effect of removing the rest" give the same LDS.

Sign convention (the one of every attribution scorer in :mod:`diffcurate.influence`): τ[q, i]
is HIGH when training on i HELPS query q, i.e. is predicted to LOWER q's diffusion loss
(EK-FAC's ``∇m(q)ᵀ(G+λI)⁻¹∇ℓ(x_i)``, TRAK's φ_qᵀ(ΦᵀΦ+λI)⁻¹φ_i, DMin's gradient cosine, BIF's
Cov = −BIF). A higher g_m(q) therefore predicts a LOWER loss, so the measurement ``f`` passed to
:func:`linear_datamodeling_score` must be oriented as a benefit: pass the NEGATED loss (or use
:func:`lds_from_losses`, which negates for you). With that orientation a perfect method scores
+1 and a method whose signs are flipped scores −1.

Pure numpy/scipy: the benchmark (``benchmarks/lds.py``) does the retraining; every number here
can be recomputed in a test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

DEFAULT_ALPHA = 0.5
"""Fraction of the training set in each LDS subset (seed 001 and Park et al. use 50%)."""


@dataclass(frozen=True)
class LDSResult:
    """LDS of one attribution method.

    Attributes:
        per_query: ``[n_query]`` Spearman correlation of each query (0 where either side is
            constant over the subsets: a ranking of nothing carries no information).
        mean: Mean over queries, the LDS.
        stderr: Standard error of the mean over queries (NaN for a single query).
    """

    per_query: np.ndarray
    mean: float
    stderr: float


def random_subsets(
    n_train: int, n_subsets: int, alpha: float = DEFAULT_ALPHA, seed: int = 0
) -> np.ndarray:
    """``n_subsets`` random subsets of ``round(alpha · n_train)`` training indices each.

    Why one generator per subset, seeded by ``(seed, m)``: subset m is the same whatever
    ``n_subsets`` is, so a benchmark extended from M to 2M subsets reuses the first M retrained
    models, and a result is reproducible from the seed alone.

    Args:
        n_train: Training-set size.
        n_subsets: M, the number of subsets.
        alpha: Fraction of the training set per subset, in (0, 1].
        seed: Seed of the draws.

    Returns:
        Boolean ``[n_subsets, n_train]`` masks, every row with exactly ``round(alpha · n_train)``
        True entries (sampled without replacement).
    """
    if n_train < 1 or n_subsets < 1:
        raise ValueError("need n_train >= 1 and n_subsets >= 1")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    size = max(1, round(alpha * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        rng = np.random.default_rng([seed, m])
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def group_attributions(tau: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted group effects ``g[m, q] = Σ_{i ∈ S_m} τ[q, i]``: ``[M, n_query]`` float64."""
    tau = np.asarray(tau, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if tau.ndim != 2 or masks.ndim != 2 or tau.shape[1] != masks.shape[1]:
        raise ValueError(
            f"expected tau [n_query, n_train] and masks [M, n_train], got {tau.shape}, "
            f"{masks.shape}"
        )
    return masks.astype(np.float64) @ tau.T


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def linear_datamodeling_score(tau: np.ndarray, masks: np.ndarray, f: np.ndarray) -> LDSResult:
    """LDS of attribution scores ``tau`` against measured outputs ``f`` (module docstring).

    Args:
        tau: ``[n_query, n_train]`` attribution scores, HIGH = training on the sample helps.
        masks: ``[M, n_train]`` boolean subset masks (e.g. :func:`random_subsets`).
        f: ``[M, n_query]`` measurement of each query under the models retrained on each subset
            (averaged over seeds), oriented as a benefit (e.g. the NEGATED loss).

    Returns:
        :class:`LDSResult` with the per-query Spearman correlations, their mean and stderr.
    """
    g = group_attributions(tau, masks)
    f = np.asarray(f, dtype=np.float64)
    if f.shape != g.shape:
        raise ValueError(f"f must be [M, n_query] = {g.shape}, got {f.shape}")
    if g.shape[0] < 3:
        raise ValueError("need at least 3 subsets for a rank correlation")
    if not np.isfinite(f).all() or not np.isfinite(g).all():
        raise ValueError("non-finite measurements or attribution scores")
    per_query = np.array([_spearman(g[:, q], f[:, q]) for q in range(g.shape[1])])
    n = len(per_query)
    stderr = float(per_query.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return LDSResult(per_query=per_query, mean=float(per_query.mean()), stderr=stderr)


def lds_from_losses(tau: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> LDSResult:
    """LDS when the measurement is a loss (lower = better): ``f = −losses``.

    Args:
        tau: ``[n_query, n_train]`` attribution scores, HIGH = training on the sample lowers
            the query's loss.
        masks: ``[M, n_train]`` boolean subset masks.
        losses: ``[M, n_query]`` query losses under the retrained models (seed-averaged).
    """
    return linear_datamodeling_score(tau, masks, -np.asarray(losses, dtype=np.float64))
