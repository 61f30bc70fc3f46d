"""Duplicate groups: exact (sha256), perceptual (pHash Hamming) and semantic (CLIP cosine).

Groups are recorded, never acted on here: how often an image repeats is itself a memorization
signal the scorers use later. Near-duplicate groups are connected components of the "is a near
duplicate of" graph (so groups are transitive by construction), computed with scipy's sparse
graph routines.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_VERIFY_BLOCK = 2048


@dataclass(frozen=True)
class DuplicateGroups:
    """Per-sample group labels, aligned with the input order."""

    exact_group: list[str]
    exact_group_size: np.ndarray
    near_group: list[str]
    near_group_size: np.ndarray
    near_method: str

    def summary(self) -> dict[str, int]:
        exact = dict(zip(self.exact_group, self.exact_group_size, strict=True))
        near = dict(zip(self.near_group, self.near_group_size, strict=True))
        return {
            "exact_groups": sum(1 for s in exact.values() if s > 1),
            "exact_rows": int(sum(s for s in exact.values() if s > 1)),
            "near_groups": sum(1 for s in near.values() if s > 1),
            "near_rows": int(sum(s for s in near.values() if s > 1)),
        }


def phash_to_uint64(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def _band_masks(max_distance: int) -> list[tuple[int, np.uint64]]:
    """Split 64 bits into max_distance + 1 bands. Pigeonhole: two hashes within Hamming
    distance d differ in at most d bands, so they agree exactly on at least one."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    return [
        (int(lo), np.uint64(((1 << int(hi - lo)) - 1) << int(lo)))
        for lo, hi in itertools.pairwise(edges)
        if hi > lo
    ]


def phash_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All index pairs (i < j) with Hamming(hash_i, hash_j) <= max_distance, shape ``[m, 2]``.

    Candidates come from exact matches on bit bands (multi-index hashing), then every
    candidate is verified, so the result equals the brute-force answer.
    """
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if max_distance >= 64:
        i, j = np.triu_indices(n, k=1)
        return np.stack([i, j], axis=1).astype(np.int64)
    found: list[np.ndarray] = []
    for _, mask in _band_masks(max_distance):
        band = hashes & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            found.append(_verified_pairs(hashes, np.sort(order[s:e]), max_distance))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _verified_pairs(hashes: np.ndarray, members: np.ndarray, max_distance: int) -> np.ndarray:
    out = []
    for a in range(0, len(members), _VERIFY_BLOCK):
        rows = members[a : a + _VERIFY_BLOCK]
        dist = np.bitwise_count(hashes[rows][:, None] ^ hashes[members][None, :])
        r, c = np.nonzero(dist <= max_distance)
        i, j = rows[r], members[c]
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out).astype(np.int64)


def cosine_pairs(embeddings: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """All index pairs (i < j) whose unit-norm embeddings have cosine >= threshold.

    Exact blocked search, O(n^2 d): right for up to a few hundred thousand rows on one machine.
    """
    n = len(embeddings)
    out = [np.zeros((0, 2), dtype=np.int64)]
    emb = np.asarray(embeddings, dtype=np.float32)
    for a in range(0, n, block):
        sims = emb[a : a + block] @ emb.T
        r, c = np.nonzero(sims >= threshold)
        i = r + a
        keep = i < c
        out.append(np.stack([i[keep], c[keep]], axis=1).astype(np.int64))
    return np.concatenate(out)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)
    )
    _, labels = connected_components(graph, directed=False)
    return labels


def _name_groups(labels: np.ndarray, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Name each group by its smallest member name (stable across runs and orderings)."""
    first: dict[int, str] = {}
    for label, name in zip(labels.tolist(), names, strict=True):
        if label not in first or name < first[label]:
            first[label] = name
    sizes = np.bincount(labels)
    return [first[lab] for lab in labels.tolist()], sizes[labels].astype(np.int32)


def duplicate_groups(
    sample_ids: list[str],
    sha256s: list[str],
    phashes: list[str],
    embeddings: np.ndarray | None,
    *,
    phash_max_distance: int,
    clip_threshold: float,
) -> DuplicateGroups:
    """Compute exact and near-duplicate groups for one dataset.

    Near duplicates join on pHash distance, on CLIP cosine when embeddings are given, and on
    exact byte identity; the group is the connected component of all those links.
    """
    n = len(sample_ids)
    _, exact_labels = np.unique(np.array(sha256s, dtype=object), return_inverse=True)
    exact_labels = exact_labels.reshape(-1)
    exact_sizes = np.bincount(exact_labels)[exact_labels].astype(np.int32) if n else np.zeros(0)

    pairs = [phash_pairs(phash_to_uint64(phashes), phash_max_distance)]
    method = "phash"
    if embeddings is not None and len(embeddings):
        pairs.append(cosine_pairs(embeddings, clip_threshold))
        method = "phash+clip"
    if n:
        # Exact duplicates are near duplicates too, whatever their hashes say.
        order = np.argsort(exact_labels, kind="stable")
        same = exact_labels[order][1:] == exact_labels[order][:-1]
        pairs.append(np.stack([order[:-1][same], order[1:][same]], axis=1).astype(np.int64))
    labels = _components(n, np.concatenate(pairs)) if n else np.zeros(0, dtype=np.int64)
    near_group, near_sizes = _name_groups(labels, sample_ids) if n else ([], np.zeros(0))
    return DuplicateGroups(
        exact_group=list(sha256s),
        exact_group_size=exact_sizes,
        near_group=near_group,
        near_group_size=near_sizes,
        near_method=method,
    )
