import numpy as np
import pytest

import diffcurate.ingest.dedup as dedup
from diffcurate.ingest.dedup import ComponentLabels, cosine_pairs, duplicate_groups, phash_pairs


def brute_hamming_pairs(hashes: np.ndarray, d: int) -> set[tuple[int, int]]:
    n = len(hashes)
    return {
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= d
    }


def planted_hashes(n: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes plus near copies at distances 0..8 of some of them."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, size=n, dtype=np.uint64
    )
    near = []
    for i in range(0, n, 5):
        flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
        mask = np.uint64(sum(1 << int(b) for b in flips))
        near.append(base[i] ^ mask)
    return np.concatenate([base, np.array(near, dtype=np.uint64)])


@pytest.mark.parametrize("d", [0, 1, 4, 8, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_phash_pairs_equal_brute_force(d, seed):
    hashes = planted_hashes(150, seed)
    got = {tuple(p) for p in phash_pairs(hashes, d).tolist()}
    assert got == brute_hamming_pairs(hashes, d)


def test_phash_pairs_handle_large_identical_buckets():
    hashes = np.array([7] * 300 + [2**40], dtype=np.uint64)
    pairs = phash_pairs(hashes, 2)
    assert len(pairs) == 300 * 299 // 2


def test_cosine_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb[10] = emb[3] + 0.01 * rng.normal(size=16)
    emb[200] = emb[3] + 0.02 * rng.normal(size=16)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.9}
    got = {tuple(p) for p in cosine_pairs(emb, 0.9).tolist()}
    assert got == want
    assert {(3, 10), (3, 200), (10, 200)} <= got


def test_groups_are_transitive_components_named_by_smallest_id():
    ids = ["e", "b", "a", "d", "c", "f"]
    sha = ["s1", "s2", "s1", "s3", "s4", "s5"]
    # b~d (distance 1) and d~c (distance 1) but b,c distance 2 > 1: still one group.
    ph = ["0000000000000000", "00000000000000f0", "0000000000000000", "00000000000000f1",
          "00000000000000f3", "ffffffffffffffff"]  # fmt: skip
    g = duplicate_groups(ids, sha, ph, phash_max_distance=1, clip_threshold=0.95)
    assert g.exact_group == sha
    assert g.exact_group_size.tolist() == [2, 1, 2, 1, 1, 1]
    # e and a: identical bytes and hash; b, d, c: chained near duplicates; f alone.
    assert g.near_group == ["a", "b", "a", "b", "b", "f"]
    assert g.near_group_size.tolist() == [2, 3, 2, 3, 3, 1]
    assert g.near_method == "phash"
    assert g.summary() == {"exact_groups": 1, "exact_rows": 2, "near_groups": 2, "near_rows": 5}


def test_exact_duplicates_group_even_when_hashes_differ_and_clip_links():
    ids = ["a", "b", "c"]
    emb = np.array([[1, 0], [0, 1], [0.0, 1.0]], dtype=np.float32)
    g = duplicate_groups(
        ids, ["x", "x", "y"], ["0" * 16, "f" * 16, "0" * 15 + "1"], [(np.arange(3), emb)],
        phash_max_distance=0, clip_threshold=0.99,
    )  # fmt: skip
    # a-b exact bytes, b-c CLIP-identical: one component of three.
    assert g.near_group == ["a", "a", "a"]
    assert g.near_method == "phash+clip"


def test_empty_dataset():
    g = duplicate_groups([], [], [], phash_max_distance=4, clip_threshold=0.95)
    assert g.summary() == {"exact_groups": 0, "exact_rows": 0, "near_groups": 0, "near_rows": 0}


def test_cosine_only_compares_within_an_embedding_set():
    emb = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    # Rows 0 and 2 have identical vectors but from different models: not linked.
    g = duplicate_groups(
        ["a", "b", "c"], ["1", "2", "3"], ["0" * 16, "f" * 16, "0f" * 8],
        [(np.array([0]), emb[:1]), (np.array([2]), emb[1:])],
        phash_max_distance=0, clip_threshold=0.9,
    )  # fmt: skip
    assert g.near_group == ["a", "b", "c"]


def test_component_labels_match_scipy_on_random_graphs_with_small_buffers(monkeypatch):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    monkeypatch.setattr(dedup, "_COMPACT_EDGES", 7)  # force many folds
    rng = np.random.default_rng(0)
    n = 200
    edges = rng.integers(0, n, size=(150, 2))
    acc = ComponentLabels(n)
    for block in np.array_split(edges, 13):
        acc.add(block)
    got = acc.result()
    _, want = connected_components(
        coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
        directed=False,
    )
    # Same partition: labels agree up to renaming.
    pairs = {(int(a), int(b)) for a, b in zip(got, want, strict=True)}
    assert len(pairs) == len(set(got)) == len(set(want))


def test_tight_cluster_groups_in_bounded_memory(monkeypatch):
    """5,000 identical embeddings: 12.5M matching pairs, processed in small blocks."""
    import tracemalloc

    monkeypatch.setattr(dedup, "_BLOCK_CELLS", 200_000)
    n = 5000
    emb = np.ones((n, 8), dtype=np.float32) / np.sqrt(8)
    ids = [f"s{i:05d}" for i in range(n)]
    tracemalloc.start()
    g = duplicate_groups(
        ids, ids, [f"{i:016x}" for i in range(n)], [(np.arange(n), emb)],
        phash_max_distance=0, clip_threshold=0.99,
    )  # fmt: skip
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert set(g.near_group) == {"s00000"} and g.near_group_size[0] == n
    # Holding all pairs at once needs 12.5M x 2 x 8 bytes = 200 MB before any grouping (the
    # old implementation peaked far above that); blocks plus 1M-edge folds stay near 60 MB.
    assert peak < 100 * 2**20, peak


def test_phash_distance_out_of_range_is_refused():
    with pytest.raises(ValueError, match="max_distance"):
        phash_pairs(np.zeros(3, np.uint64), 64)
