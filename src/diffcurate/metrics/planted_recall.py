"""How well a risk score ranks a known (planted) set of memorized images: recall@k and rank.

Benchmarks and the evaluation harness plant duplicated images in a corpus and ask whether a
scorer puts them at the top. Several scorers produce ties (``global-hessian`` gives every
sample of a minibatch the same score, ``clip-knn`` counts neighbours, scores saturate in low
precision), and a naive ``argsort`` then breaks ties by input position. Planted images usually
sit at the end of a benchmark corpus, so position order silently ranks them below (or, with
the opposite sort direction, above) every tied ordinary image. Both functions here are
therefore defined under *uniformly random tie-breaking*:

* recall@k is the **expected** recall: every planted image strictly above the k-th score
  counts 1, and a tie group straddling the boundary shares its free slots evenly, so each of
  its planted members counts ``free slots / tie size``;
* ranks are **mid-ranks** (the mean of the positions a tie group occupies; 1 = riskiest), the
  expected rank under random tie-breaking.

Without ties both equal the plain argsort answers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
from scipy.stats import rankdata


def top_k_for_fraction(n: int, fraction: float) -> int:
    """Size of the top-``fraction`` window of ``n`` samples: ceil(fraction * n), at least 1."""
    if n < 1:
        raise ValueError("need at least one scored sample")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * n - 1e-9))


def expected_recall_at_k(
    scores: Sequence[float] | np.ndarray, ids: Sequence[str], planted: Collection[str], k: int
) -> float:
    """Expected share of ``planted`` among the ``k`` highest scores, ties broken at random.

    Args:
        scores: One risk score per id; higher = riskier. NaN is refused.
        ids: Sample ids aligned with ``scores``.
        planted: The ids that should rank at the top; every one must be in ``ids``.
        k: Window size (1 ≤ k ≤ len(ids)).

    Returns:
        A value in [0, 1]; fractional when a tie straddles the window's boundary.
    """
    s, is_planted = _checked(scores, ids, planted)
    if not 1 <= k <= len(s):
        raise ValueError(f"k must be in [1, {len(s)}], got {k}")
    cut = np.sort(s)[::-1][k - 1]
    above, tied = s > cut, s == cut
    free = k - int(above.sum())
    hits = float((is_planted & above).sum()) + float((is_planted & tied).sum()) * free / tied.sum()
    return hits / float(is_planted.sum())


def mid_ranks(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rank of every score, 1 = highest; tied scores share the mean of their positions."""
    return rankdata(-np.asarray(scores, dtype=np.float64), method="average")


def planted_recall_and_rank(
    scores: Sequence[float] | np.ndarray,
    ids: Sequence[str],
    planted: Collection[str],
    fraction: float = 0.01,
) -> tuple[float, float]:
    """Expected recall@``fraction`` of ``planted`` and their median mid-rank.

    Returns:
        ``(recall, median_rank)``; the window is ``top_k_for_fraction(len(ids), fraction)``.
    """
    s, is_planted = _checked(scores, ids, planted)
    k = top_k_for_fraction(len(s), fraction)
    recall = expected_recall_at_k(s, ids, planted, k)
    return recall, float(np.median(mid_ranks(s)[is_planted]))


def _checked(
    scores: Sequence[float] | np.ndarray, ids: Sequence[str], planted: Collection[str]
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(ids):
        raise ValueError(f"{len(s)} scores for {len(ids)} ids")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; rank only finished scores")
    wanted = set(planted)
    if not wanted:
        raise ValueError("the planted set is empty")
    missing = wanted - set(ids)
    if missing:
        raise ValueError(f"{len(missing)} planted ids are not scored, e.g. {sorted(missing)[0]!r}")
    return s, np.array([i in wanted for i in ids])
