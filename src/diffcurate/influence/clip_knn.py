"""The ``clip-knn`` baseline: CLIP-embedding neighbours (Somepalli et al. 2023; seed 000 §4).

Somepalli et al. ("Understanding and mitigating copying in diffusion models") tie copying to
duplication in the training set and find copies by embedding similarity. Seed 000 §4 adapts that
into a pruning baseline: "discarding training images whose penultimate-layer CLIP embeddings fall
within the k=5 nearest neighbours of any secret image". Three modes, all on precomputed CLIP image
embeddings (``[n, d]`` arrays; this module loads no model):

``"duplicates"`` (default)
    score_i = #{ j ≠ i in the reference corpus : cos(e_i, e_j) ≥ τ }, the near-duplicate count:
    heavily duplicated images are the ones diffusion models copy. No secret set needed.
``"secret-max"``
    score_i = max_s cos(e_i, e_s) over the secret/canary embeddings: closeness to what must not
    be reproduced.
``"secret-knn"`` (seed 000's rule)
    score_i = the number of secrets whose k nearest training images (by cosine, over the whole
    reference corpus) include i. Flag with threshold ≥ 1 to remove exactly the union of the
    secrets' k-NN sets, as the seed describes.

Cosine similarity is computed on L2-normalised rows in float64; zero or non-finite embeddings
raise ``ValueError``. The reference corpus is processed ``block_size`` rows at a time, so memory is
O(shard × block), and a shard's scores depend only on its rows and the reference set: scoring
shard by shard against the same reference gives the one-pass scores. ``"secret-knn"`` needs the
global k nearest neighbours of each secret; :class:`SecretNeighbours` merges them over reference
shards in O(secrets × k) memory. Ties (equal cosine) are broken by the sample key's string, so
results do not depend on shard order.

Default τ = 0.95 on CLIP cosine, the near-copy threshold ``metrics.memorization`` uses for
``clip_cosine``; it is a near-duplicate threshold, not a value from the papers (Somepalli et al.
threshold SSCD copy-detection features, not CLIP). k = 5 is seed 000's.

Attribution: :func:`clip_attribution` is the cosine similarity ``[n_query, n_train]`` of query
(e.g. generated-image) embeddings to training embeddings, the embedding-similarity reference of
attribution benchmarks.

Pure numpy: imports no torch model code, prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from diffcurate.influence.objective import SampleKey, ScoreResult


class ClipKNNConfig(BaseModel):
    """Configuration of the CLIP-neighbour baseline.

    Attributes:
        mode: ``"duplicates"``, ``"secret-max"`` or ``"secret-knn"`` (module docstring).
        tau: Cosine threshold of a near duplicate (``"duplicates"``).
        k: Nearest training neighbours per secret (``"secret-knn"``).
        block_size: Reference rows per similarity block (memory bound only).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["duplicates", "secret-max", "secret-knn"] = "duplicates"
    tau: float = Field(0.95, ge=-1.0, le=1.0)
    k: int = Field(5, ge=1)
    block_size: int = Field(4096, ge=1)


def normalise(embeddings: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """L2-normalised float64 rows of ``[n, d]`` embeddings (zero/non-finite rows rejected)."""
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected [n, d], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: non-finite values")
    norms = np.linalg.norm(arr, axis=1)
    if arr.shape[0] and not (norms > 0).all():
        raise ValueError(f"{what}: zero embedding rows {np.flatnonzero(norms == 0)[:10].tolist()}")
    return arr / norms[:, None] if arr.shape[0] else arr


def _check_keys(keys: Sequence[SampleKey], n: int, what: str) -> list[str]:
    if len(keys) != n:
        raise ValueError(f"{what}: {n} embeddings but {len(keys)} keys")
    names = [str(k) for k in keys]
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate keys")
    return names


def clip_attribution(query_embeddings: np.ndarray, train_embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[n_query, n_train]`` (float64)."""
    q = normalise(query_embeddings, "query embeddings")
    t = normalise(train_embeddings, "training embeddings")
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"embedding widths differ: {q.shape[1]} vs {t.shape[1]}")
    return q @ t.T


def duplicate_counts(
    keys: Sequence[SampleKey],
    embeddings: np.ndarray,
    reference_keys: Sequence[SampleKey],
    reference_embeddings: np.ndarray,
    tau: float = 0.95,
    block_size: int = 4096,
) -> np.ndarray:
    """Per row, the number of OTHER reference samples with cosine ≥ τ: ``[n]`` int64.

    A reference row with the same key as the scored row is the sample itself and not counted.
    """
    x = normalise(embeddings, "embeddings")
    ref = normalise(reference_embeddings, "reference embeddings")
    names = _check_keys(keys, x.shape[0], "embeddings")
    ref_names = _check_keys(reference_keys, ref.shape[0], "reference embeddings")
    if x.shape[0] and ref.shape[0] and x.shape[1] != ref.shape[1]:
        raise ValueError(f"embedding widths differ: {x.shape[1]} vs {ref.shape[1]}")
    counts = np.zeros(x.shape[0], dtype=np.int64)
    row_of = {name: i for i, name in enumerate(names)}
    self_pairs = [(row_of[name], j) for j, name in enumerate(ref_names) if name in row_of]
    for start in range(0, ref.shape[0], block_size):
        block = ref[start : start + block_size]
        close = x @ block.T >= tau
        for i, j in self_pairs:  # the sample itself (same key) is not its own duplicate
            if start <= j < start + block.shape[0]:
                close[i, j - start] = False
        counts += close.sum(axis=1)
    return counts


def secret_max_similarity(
    embeddings: np.ndarray, secrets: np.ndarray, block_size: int = 4096
) -> np.ndarray:
    """max over secrets of cos(e_i, e_s): ``[n]`` float64."""
    x = normalise(embeddings, "embeddings")
    s = normalise(secrets, "secret embeddings")
    if s.shape[0] == 0:
        raise ValueError("the secret set is empty")
    if x.shape[0] and x.shape[1] != s.shape[1]:
        raise ValueError(f"embedding widths differ: {x.shape[1]} vs {s.shape[1]}")
    best = np.full(x.shape[0], -np.inf)
    for start in range(0, s.shape[0], block_size):
        best = np.maximum(best, (x @ s[start : start + block_size].T).max(axis=1, initial=-np.inf))
    return best


class SecretNeighbours:
    """The k nearest reference samples of every secret, merged over reference shards.

    Order: cosine descending, then key string ascending (so ties do not depend on shard order).
    Memory: O(secrets × k) besides the shard being added.
    """

    def __init__(self, secrets: np.ndarray, k: int = 5) -> None:
        self.secrets = normalise(secrets, "secret embeddings")
        if self.secrets.shape[0] == 0:
            raise ValueError("the secret set is empty")
        self.k = int(k)
        n_s = self.secrets.shape[0]
        self._sims = [np.empty(0) for _ in range(n_s)]
        self._keys: list[list[str]] = [[] for _ in range(n_s)]
        self._seen: set[str] = set()

    def add(self, keys: Sequence[SampleKey], embeddings: np.ndarray) -> None:
        """Merge one reference shard (keys must not repeat across shards)."""
        x = normalise(embeddings, "reference embeddings")
        names = _check_keys(keys, x.shape[0], "reference embeddings")
        if self._seen.intersection(names):
            raise ValueError("a reference key was added twice")
        self._seen.update(names)
        if x.shape[0] == 0:
            return
        if x.shape[1] != self.secrets.shape[1]:
            raise ValueError(f"embedding widths differ: {x.shape[1]} vs {self.secrets.shape[1]}")
        sims = self.secrets @ x.T
        for s in range(self.secrets.shape[0]):
            all_sims = np.concatenate([self._sims[s], sims[s]])
            all_keys = self._keys[s] + names
            order = sorted(range(len(all_keys)), key=lambda j: (-all_sims[j], all_keys[j]))
            keep = order[: self.k]
            self._sims[s] = all_sims[keep]
            self._keys[s] = [all_keys[j] for j in keep]

    def neighbours(self) -> list[list[tuple[str, float]]]:
        """Per secret, its k nearest reference keys with cosines (best first)."""
        return [
            list(zip(keys, sims.tolist(), strict=True))
            for keys, sims in zip(self._keys, self._sims, strict=True)
        ]

    def counts(self, keys: Sequence[SampleKey]) -> np.ndarray:
        """For each key, the number of secrets whose k-NN set contains it: ``[n]`` int64."""
        tally: dict[str, int] = {}
        for names in self._keys:
            for name in names:
                tally[name] = tally.get(name, 0) + 1
        return np.array([tally.get(str(k), 0) for k in keys], dtype=np.int64)


def clip_knn_risk(
    sample_keys: Sequence[SampleKey],
    embeddings: np.ndarray,
    config: ClipKNNConfig | None = None,
    *,
    reference_keys: Sequence[SampleKey] | None = None,
    reference_embeddings: np.ndarray | None = None,
    secrets: np.ndarray | None = None,
) -> ScoreResult:
    """Scorer-contract risk scores of one shard (HIGH = risky; ``stderr`` NaN: deterministic).

    Args:
        sample_keys: The shard's ids.
        embeddings: ``[n, d]`` CLIP image embeddings of the shard.
        config: Mode, τ, k, block size.
        reference_keys: Ids of the reference corpus (``"duplicates"`` and ``"secret-knn"``:
            neighbours are searched there); default: the shard itself.
        reference_embeddings: ``[N, d]`` embeddings of the reference corpus.
        secrets: ``[S, d]`` secret/canary embeddings (``"secret-max"``, ``"secret-knn"``).
    """
    config = config or ClipKNNConfig()
    if (reference_keys is None) != (reference_embeddings is None):
        raise ValueError("give reference_keys and reference_embeddings together")
    if reference_keys is None or reference_embeddings is None:
        reference_keys, reference_embeddings = sample_keys, embeddings
    if config.mode == "duplicates":
        score = duplicate_counts(
            sample_keys,
            embeddings,
            reference_keys,
            reference_embeddings,
            config.tau,
            config.block_size,
        ).astype(np.float64)
        method = f"clip-knn/duplicates/tau{config.tau:g}"
    else:
        if secrets is None:
            raise ValueError(f"mode {config.mode!r} needs secret embeddings")
        _check_keys(sample_keys, np.asarray(embeddings).shape[0], "embeddings")
        if config.mode == "secret-max":
            score = secret_max_similarity(embeddings, secrets, config.block_size)
            method = "clip-knn/secret-max"
        else:
            index = SecretNeighbours(secrets, config.k)
            ref = np.asarray(reference_embeddings)
            for start in range(0, ref.shape[0], config.block_size):
                sl = slice(start, start + config.block_size)
                index.add(list(reference_keys)[sl], ref[sl])
            score = index.counts(sample_keys).astype(np.float64)
            method = f"clip-knn/secret-knn/k{config.k}"
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=score,
        stderr=np.full(score.shape, np.nan),
        per_layer=None,
        layer_names=(),
        per_timestep=None,
        timesteps=None,
        method=method,
    )
