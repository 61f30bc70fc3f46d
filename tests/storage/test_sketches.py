"""The LanceDB sketches table: idempotent writes, exact inner-product search, ANN recall."""

from __future__ import annotations

import time

import numpy as np
import pytest

from diffcurate.influence.dmin import attribution_scores
from diffcurate.storage.sketches import SketchStore, sketch_schema


def clustered_sketches(
    n: int, n_t: int, v: int, seed: int, n_clusters: int = 100, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """DMin-like sketches ``[n, T, v]``: per-timestep blocks of norm ≈ 1 (normalised gradients
    after an unbiased sketch), grouped in clusters with within-cluster cosines ≈ 0.5, plus the
    cluster centres ``[n_clusters, T, v]`` to draw queries from."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, n_t, v))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, n_t, v)) / np.sqrt(v)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x *= 1 + np.sqrt(2 / v) * rng.standard_normal((n, n_t, 1))  # sketch norms are not exactly 1
    return x.astype(np.float32), centres


def queries_near(centres: np.ndarray, n_q: int, seed: int) -> np.ndarray:
    """New members of random clusters (like generated images), not copies of stored rows."""
    rng = np.random.default_rng(seed)
    v = centres.shape[-1]
    q = centres[rng.integers(0, len(centres), n_q)] + rng.standard_normal(
        (n_q, *centres.shape[1:])
    ) / np.sqrt(v)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return q.astype(np.float32)


def ids(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def exact_top(train: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = attribution_scores(queries, train).numpy()
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_at_k(store: SketchStore, train: np.ndarray, queries: np.ndarray, k: int) -> float:
    truth = exact_top(train, queries, k)
    found = store.top_k(queries, k, run_id="r1")
    hits = [
        len({f"s{j:05d}" for j in truth[i]} & set(res.sample_ids)) for i, res in enumerate(found)
    ]
    return sum(hits) / (k * len(queries))


# ---------------------------------------------------------------------------------- writes
def test_writes_are_idempotent_and_append_only(tmp_path):
    store = SketchStore(str(tmp_path / "db"))
    rng = np.random.default_rng(0)
    first = rng.standard_normal((3, 2, 8)).astype(np.float32)
    assert store.write("r1", "digits", ["a", "b", "c"], first, timesteps=[10, 400]) == 3
    # A retried shard overlapping the stored one: only the new sample is inserted, and the
    # stored sketches are not overwritten by the retry's values.
    retry = rng.standard_normal((2, 2, 8)).astype(np.float32)
    assert store.write("r1", "digits", ["c", "d"], retry, timesteps=[10, 400]) == 1
    assert store.write("r1", "digits", ["a", "b", "c"], first, timesteps=[10, 400]) == 0
    assert store.count() == 4 and store.count("r1") == 4
    got_ids, vectors = store.read("r1")
    by_id = dict(zip(got_ids, vectors, strict=True))
    np.testing.assert_array_equal(by_id["c"], first[2].reshape(-1))
    np.testing.assert_array_equal(by_id["d"], retry[1].reshape(-1))
    # Another run keeps its own rows for the same samples.
    assert store.write("r2", "digits", ["a"], first[:1], timesteps=[10, 400]) == 1
    assert store.count("r1") == 4 and store.count("r2") == 1
    assert store.stored_ids("r2") == {"a"}
    row = store._table().to_arrow().to_pylist()[0]
    assert row["timesteps"] == [10, 400] and row["sketch_dim"] == 8
    assert store._table().schema.equals(sketch_schema(16))


def test_bad_writes_are_refused(tmp_path):
    store = SketchStore(str(tmp_path / "db"))
    sk = np.ones((2, 1, 4), dtype=np.float32)
    store.write("r1", "d", ["a", "b"], sk, timesteps=[5])
    with pytest.raises(ValueError, match="width 4 but these have 8"):
        store.write("r1", "d", ["c"], np.ones((1, 2, 4)), timesteps=[5, 6])
    with pytest.raises(ValueError, match="T = 2"):
        store.write("r1", "d", ["a", "b"], sk, timesteps=[5, 6])
    with pytest.raises(ValueError, match="duplicate sample ids"):
        store.write("r1", "d", ["x", "x"], sk, timesteps=[5])
    with pytest.raises(ValueError, match="invalid run id"):
        store.write("r1' OR '1'='1", "d", ["a", "b"], sk, timesteps=[5])
    with pytest.raises(ValueError, match="invalid dataset name"):
        store.write("r1", "../d", ["a", "b"], sk, timesteps=[5])
    with pytest.raises(FloatingPointError):
        store.write("r1", "d", ["y", "z"], sk * np.nan, timesteps=[5])
    assert store.count() == 2


# ---------------------------------------------------------------------------------- search
def test_exact_top_k_is_the_sum_of_per_timestep_inner_products_within_one_run(tmp_path):
    store = SketchStore(str(tmp_path / "db"))
    train, centres = clustered_sketches(300, 3, 32, seed=1, n_clusters=5)
    store.write("r1", "d", ids(300), train, timesteps=[50, 500, 950])
    # Another run with sketches that would outscore everything: must not leak into r1.
    store.write("r2", "d", ids(5, "x"), 10 * train[:5], timesteps=[50, 500, 950])
    q = queries_near(centres, 4, seed=2)
    truth = attribution_scores(q, train).numpy()
    for qi, res in enumerate(store.top_k(q, 7, run_id="r1", exact=True)):
        order = np.argsort(-truth[qi], kind="stable")[:7]
        assert res.sample_ids == [f"s{j:05d}" for j in order]
        np.testing.assert_allclose(res.scores, truth[qi, order], atol=2e-5)
    flat = store.top_k(q.reshape(4, -1)[0], 3, run_id="r1", exact=True)
    assert flat[0].sample_ids == store.top_k(q[:1], 3, run_id="r1", exact=True)[0].sample_ids
    with pytest.raises(ValueError, match="query width"):
        store.top_k(q[:, :2], 3, run_id="r1")


def test_index_recall_at_10_on_10k_sketches(tmp_path):
    """Fast variant: 10k sketches of T = 2 timesteps × v = 256 (512 floats per sample)."""
    store = SketchStore(str(tmp_path / "db"))
    train, centres = clustered_sketches(10_000, 2, 256, seed=3)
    store.write("r1", "d", ids(10_000), train, timesteps=[100, 600])
    start = time.perf_counter()
    store.create_index()
    build_s = time.perf_counter() - start
    assert store.has_index()
    queries = queries_near(centres, 40, seed=4)
    recall = recall_at_k(store, train, queries, 10)
    assert recall >= 0.95, (recall, build_s)
    # Rows appended after the build are still searched (Lance scans unindexed fragments).
    twin = queries[:1] * 1.5
    store.write("r1", "d", ["late"], twin, timesteps=[100, 600])
    assert store.top_k(queries[:1], 1, run_id="r1")[0].sample_ids == ["late"]


@pytest.mark.slow
def test_index_recall_at_10_on_10k_sketches_at_the_default_dimension(tmp_path):
    """10k sketches of one timestep at v = 2^12 (the paper's and our default)."""
    store = SketchStore(str(tmp_path / "db"))
    train, centres = clustered_sketches(10_000, 1, 4096, seed=5)
    store.write("r1", "d", ids(10_000), train, timesteps=[500])
    store.create_index()
    assert recall_at_k(store, train, queries_near(centres, 40, seed=6), 10) >= 0.95


def test_searching_an_empty_store_returns_nothing(tmp_path):
    store = SketchStore(str(tmp_path / "db"))
    assert store.count() == 0 and store.width() is None and not store.has_index()
    res = store.top_k(np.zeros((2, 1, 4)), 3, run_id="r1")
    assert [r.sample_ids for r in res] == [[], []]
