"""CLIP-neighbour baseline: counts and neighbour sets against brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest

from diffcurate.influence.clip_knn import (
    ClipKNNConfig,
    SecretNeighbours,
    clip_attribution,
    clip_knn_risk,
    duplicate_counts,
    secret_max_similarity,
)


def corpus(n: int = 60, d: int = 16, seed: int = 0):
    """Random embeddings with planted near-duplicate groups (noisy copies of a few rows)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d))
    for src, copies in ((0, [5, 9, 33]), (1, [2]), (7, [40, 41, 42, 43, 44])):
        for c in copies:
            emb[c] = emb[src] + 0.05 * rng.normal(size=d)
    emb[50] = 3.0 * emb[7]  # exact duplicate up to scale: cosine 1
    keys = [f"s{i}" for i in range(n)]
    return keys, emb


def brute_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = a[i] @ b[j] / (np.linalg.norm(a[i]) * np.linalg.norm(b[j]))
    return out


def test_duplicate_counts_match_brute_force_with_blocks_and_shards():
    keys, emb = corpus()
    cos = brute_cos(emb, emb)
    for tau in (0.9, 0.99, 0.5):
        expected = np.array([sum(cos[i, j] >= tau for j in range(60) if j != i) for i in range(60)])
        got = duplicate_counts(keys, emb, keys, emb, tau, block_size=7)
        np.testing.assert_array_equal(got, expected)
        shard = duplicate_counts(keys[30:], emb[30:], keys, emb, tau, block_size=16)
        np.testing.assert_array_equal(shard, expected[30:])
    planted = duplicate_counts(keys, emb, keys, emb, 0.95)
    assert planted[7] == 6 and planted[0] == 3 and planted[50] == 6 and planted[3] == 0


def test_secret_max_similarity_matches_brute_force():
    _, emb = corpus()
    secrets = np.random.default_rng(1).normal(size=(4, 16))
    secrets[2] = emb[7] + 0.01
    got = secret_max_similarity(emb, secrets, block_size=3)
    np.testing.assert_allclose(got, brute_cos(emb, secrets).max(axis=1), rtol=1e-12)
    assert int(np.argmax(got)) in {7, 40, 41, 42, 43, 44, 50}


def test_secret_knn_counts_match_brute_force_and_merge_over_shards():
    keys, emb = corpus()
    rng = np.random.default_rng(2)
    secrets = rng.normal(size=(6, 16))
    secrets[0] = emb[7]
    secrets[1] = emb[33] + 0.02 * rng.normal(size=16)
    k = 5
    cos = brute_cos(secrets, emb)
    expected = np.zeros(60, dtype=int)
    neighbours = []
    for s in range(6):
        order = sorted(range(60), key=lambda j, s=s: (-cos[s, j], keys[j]))[:k]
        neighbours.append([keys[j] for j in order])
        expected[order] += 1
    one = SecretNeighbours(secrets, k)
    one.add(keys, emb)
    np.testing.assert_array_equal(one.counts(keys), expected)
    assert [[name for name, _ in row] for row in one.neighbours()] == neighbours
    merged = SecretNeighbours(secrets, k)
    for sl in (slice(45, 60), slice(0, 13), slice(13, 45)):  # shards in any order
        merged.add(keys[sl], emb[sl])
    assert merged.neighbours() == one.neighbours()
    with pytest.raises(ValueError, match="twice"):
        merged.add(keys[:1], emb[:1])
    res = clip_knn_risk(
        keys[:20],
        emb[:20],
        ClipKNNConfig(mode="secret-knn", k=k, block_size=11),
        reference_keys=keys,
        reference_embeddings=emb,
        secrets=secrets,
    )
    np.testing.assert_array_equal(res.score, expected[:20])
    # Seed 000's rule: the removal set is the union of the secrets' k-NN sets.
    assert {keys[i] for i in np.flatnonzero(expected)} == {n for row in neighbours for n in row}


def test_ties_are_broken_by_key_not_by_shard_order():
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    keys = ["b", "a", "c"]
    index = SecretNeighbours(np.array([[1.0, 0.0]]), k=1)
    index.add(keys[:1], emb[:1])
    index.add(keys[1:], emb[1:])
    assert index.neighbours()[0][0][0] == "a"


def test_risk_modes_and_attribution():
    keys, emb = corpus()
    dup = clip_knn_risk(keys, emb)
    np.testing.assert_array_equal(dup.score, duplicate_counts(keys, emb, keys, emb, 0.95))
    assert dup.method == "clip-knn/duplicates/tau0.95" and np.isnan(dup.stderr).all()
    secrets = emb[[7, 1]]
    mx = clip_knn_risk(keys, emb, ClipKNNConfig(mode="secret-max"), secrets=secrets)
    np.testing.assert_allclose(mx.score, brute_cos(emb, secrets).max(axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="secret"):
        clip_knn_risk(keys, emb, ClipKNNConfig(mode="secret-max"))
    np.testing.assert_allclose(clip_attribution(emb[:3], emb), brute_cos(emb[:3], emb), rtol=1e-12)


def test_bad_embeddings_are_rejected():
    keys, emb = corpus()
    bad = emb.copy()
    bad[4] = 0.0
    with pytest.raises(ValueError, match="zero"):
        duplicate_counts(keys, bad, keys, emb)
    bad[4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        clip_attribution(bad, emb)
    with pytest.raises(ValueError, match="keys"):
        duplicate_counts(keys[:-1], emb, keys, emb)
    with pytest.raises(ValueError, match="duplicate keys"):
        duplicate_counts(["a"] * 60, emb, keys, emb)
