"""The ``random`` baseline: seeded uniform scores keyed by sample id (seed 000 §4, "Random").

Seed 000's Random baseline "removes the same budget of images as our method but chooses them
uniformly". Ranking by an i.i.d. uniform score and taking the top ρ% is exactly a uniform random
subset of that size. Each score is U[0, 1) from a 53-bit integer drawn by a generator seeded with
``keyed_seed(seed, sample id, "random-baseline", 0)``, so a sample's score depends only on (seed,
id): scoring shard by shard, in any order or grouping, gives the same scores as one pass, and a
resumed run reproduces them. Ids are hashed through ``str(id)``, like the (t, ε) draws.

``random_attribution`` does the same per (query id, training id) pair, the chance-level reference
for attribution benchmarks.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from diffcurate.influence.objective import SampleKey, ScoreResult, keyed_generator

_BITS = 53


class RandomConfig(BaseModel):
    """Configuration of the random baseline.

    Attributes:
        seed: Which random permutation of the corpus is drawn.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0


def _uniform(seed: int, key: SampleKey, stream: str) -> float:
    gen = keyed_generator(seed, key, stream, 0)
    bits = int(torch.randint(0, 1 << _BITS, (1,), generator=gen, dtype=torch.int64)[0])
    return bits / float(1 << _BITS)


def random_scores(
    sample_keys: Sequence[SampleKey], config: RandomConfig | None = None
) -> np.ndarray:
    """U[0, 1) per sample, a function of (seed, id) only: ``[n]`` float64."""
    config = config or RandomConfig()
    return np.array([_uniform(config.seed, k, "random-baseline") for k in sample_keys])


def random_risk(
    sample_keys: Sequence[SampleKey], config: RandomConfig | None = None
) -> ScoreResult:
    """Random risk scores (the scorer-contract result; ``stderr`` NaN: no estimate to average)."""
    config = config or RandomConfig()
    score = random_scores(sample_keys, config)
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=score,
        stderr=np.full(score.shape, np.nan),
        per_layer=None,
        layer_names=(),
        per_timestep=None,
        timesteps=None,
        method=f"random/keyed-uniform/seed{config.seed}",
    )


def random_attribution(
    train_keys: Sequence[SampleKey],
    query_keys: Sequence[SampleKey],
    config: RandomConfig | None = None,
) -> np.ndarray:
    """``[n_query, n_train]`` U[0, 1) scores keyed by the (query id, training id) pair."""
    config = config or RandomConfig()
    out = np.empty((len(query_keys), len(train_keys)))
    for a, q in enumerate(query_keys):
        for b, t in enumerate(train_keys):
            out[a, b] = _uniform(config.seed, f"{q}\x1f{t}", "random-attribution")
    return out
