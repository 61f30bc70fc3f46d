import numpy as np
import pytest

from diffcurate.ingest.dedup import cosine_pairs, duplicate_groups, phash_pairs


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
    got = {tuple(p) for p in cosine_pairs(emb, 0.9, block=64).tolist()}
    assert got == want
    assert {(3, 10), (3, 200), (10, 200)} <= got


def test_groups_are_transitive_components_named_by_smallest_id():
    ids = ["e", "b", "a", "d", "c", "f"]
    sha = ["s1", "s2", "s1", "s3", "s4", "s5"]
    # b~d (distance 1) and d~c (distance 1) but b,c distance 2 > 1: still one group.
    ph = ["0000000000000000", "00000000000000f0", "0000000000000000", "00000000000000f1",
          "00000000000000f3", "ffffffffffffffff"]  # fmt: skip
    g = duplicate_groups(ids, sha, ph, None, phash_max_distance=1, clip_threshold=0.95)
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
        ids, ["x", "x", "y"], ["0" * 16, "f" * 16, "0" * 15 + "1"], emb,
        phash_max_distance=0, clip_threshold=0.99,
    )  # fmt: skip
    # a-b exact bytes, b-c CLIP-identical: one component of three.
    assert g.near_group == ["a", "a", "a"]
    assert g.near_method == "phash+clip"


def test_empty_dataset():
    g = duplicate_groups([], [], [], None, phash_max_distance=4, clip_threshold=0.95)
    assert g.summary() == {"exact_groups": 0, "exact_rows": 0, "near_groups": 0, "near_rows": 0}
