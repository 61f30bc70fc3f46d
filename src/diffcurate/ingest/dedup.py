"""Duplicate groups: exact (sha256), perceptual (pHash Hamming) and semantic (CLIP cosine).

Groups are recorded, never acted on here: how often an image repeats is itself a memorization
signal the scorers use later. Near-duplicate groups are connected components of the "is a near
duplicate of" graph (so groups are transitive by construction), computed with scipy's sparse
graph routines.

Memory is bounded whatever the data: candidate pairs are produced in blocks and folded into the
component labels as they come, so a tight cluster of n images (n² matching pairs) never
materialises its pairs at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_BLOCK_CELLS = 4_000_000  # similarity/distance cells per block (~16-80 MB of temporaries)
_COMPACT_EDGES = 1_000_000  # buffered label edges before folding them into components


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


def phash_pair_blocks(hashes: np.ndarray, max_distance: int) -> Iterator[np.ndarray]:
    """Yield blocks of index pairs (i < j) with Hamming(hash_i, hash_j) <= max_distance.

    Candidates come from exact matches on bit bands (multi-index hashing), then every
    candidate is verified, so the union of blocks equals the brute-force answer (a pair found
    through several bands may appear in several blocks).
    """
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance must be in [0, 64), got {max_distance}")
    n = len(hashes)
    if n < 2:
        return
    for _, mask in _band_masks(max_distance):
        band = hashes & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends, strict=True):
            if e - s >= 2:
                yield from _verified_pair_blocks(hashes, np.sort(order[s:e]), max_distance)


def _verified_pair_blocks(
    hashes: np.ndarray, members: np.ndarray, max_distance: int
) -> Iterator[np.ndarray]:
    rows_per_block = max(1, _BLOCK_CELLS // len(members))
    for a in range(0, len(members), rows_per_block):
        rows = members[a : a + rows_per_block]
        dist = np.bitwise_count(hashes[rows][:, None] ^ hashes[members][None, :])
        r, c = np.nonzero(dist <= max_distance)
        i, j = rows[r], members[c]
        keep = i < j
        yield np.stack([i[keep], j[keep]], axis=1)


def phash_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All index pairs (i < j) within ``max_distance``, shape ``[m, 2]`` (for small inputs)."""
    blocks = list(phash_pair_blocks(hashes, max_distance))
    if not blocks:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(blocks).astype(np.int64), axis=0)


def cosine_pair_blocks(embeddings: np.ndarray, threshold: float) -> Iterator[np.ndarray]:
    """Yield blocks of index pairs (i < j) whose unit-norm embeddings have cosine >= threshold.

    Exact blocked search, O(n^2 d) time: right for up to a few hundred thousand rows.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    rows_per_block = max(1, _BLOCK_CELLS // max(n, 1))
    for a in range(0, n, rows_per_block):
        sims = emb[a : a + rows_per_block] @ emb.T
        r, c = np.nonzero(sims >= threshold)
        i = r + a
        keep = i < c
        yield np.stack([i[keep], c[keep]], axis=1)


def cosine_pairs(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """All index pairs (i < j) with cosine >= threshold, shape ``[m, 2]`` (for small inputs)."""
    blocks = list(cosine_pair_blocks(embeddings, threshold))
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros((0, 2), np.int64)


class ComponentLabels:
    """Connected components of a graph whose edges arrive in blocks, in bounded memory.

    Edges are mapped onto the current component labels, deduplicated, buffered, and folded in
    with scipy's ``connected_components`` whenever the buffer grows large. Once a cluster has
    merged, its further edges collapse to self-loops and cost nothing to keep.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.labels = np.arange(n, dtype=np.int64)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, pairs: np.ndarray) -> None:
        if len(pairs) == 0:
            return
        mapped = self.labels[np.asarray(pairs, dtype=np.int64)]
        mapped = mapped[mapped[:, 0] != mapped[:, 1]]
        if len(mapped) == 0:
            return
        codes = np.unique(np.minimum(mapped[:, 0], mapped[:, 1]) * self.n + mapped.max(axis=1))
        self._buffer.append(codes)
        self._buffered += len(codes)
        if self._buffered >= _COMPACT_EDGES:
            self._fold()

    def _fold(self) -> None:
        if not self._buffer:
            return
        codes = np.unique(np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0
        graph = coo_matrix(
            (np.ones(len(codes), dtype=np.int8), (codes // self.n, codes % self.n)),
            shape=(self.n, self.n),
        )
        _, component = connected_components(graph, directed=False)
        self.labels = component[self.labels]

    def result(self) -> np.ndarray:
        self._fold()
        return self.labels


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
    embedding_sets: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    *,
    phash_max_distance: int,
    clip_threshold: float,
) -> DuplicateGroups:
    """Compute exact and near-duplicate groups for one dataset.

    Args:
        sample_ids, sha256s, phashes: One entry per sample.
        embedding_sets: ``(row_indices, unit_embeddings)`` per embedding model: CLIP cosine is
            only compared within one model's embeddings, and rows without any are left out.
        phash_max_distance: Hamming threshold for perceptual near-duplicates.
        clip_threshold: Cosine threshold for semantic near-duplicates.

    Near duplicates join on pHash distance, on CLIP cosine, and on exact byte identity; the
    group is the connected component of all those links.
    """
    n = len(sample_ids)
    if n == 0:
        return DuplicateGroups([], np.zeros(0, np.int32), [], np.zeros(0, np.int32), "phash")
    _, exact_labels = np.unique(np.array(sha256s, dtype=object), return_inverse=True)
    exact_labels = exact_labels.reshape(-1)
    exact_sizes = np.bincount(exact_labels)[exact_labels].astype(np.int32)

    components = ComponentLabels(n)
    # Exact duplicates are near duplicates too, whatever their hashes say.
    order = np.argsort(exact_labels, kind="stable")
    same = exact_labels[order][1:] == exact_labels[order][:-1]
    components.add(np.stack([order[:-1][same], order[1:][same]], axis=1))
    for block in phash_pair_blocks(phash_to_uint64(phashes), phash_max_distance):
        components.add(block)
    method = "phash"
    for rows, embeddings in embedding_sets:
        if len(rows):
            method = "phash+clip"
            for block in cosine_pair_blocks(embeddings, clip_threshold):
                components.add(np.asarray(rows)[block])
    near_group, near_sizes = _name_groups(components.result(), sample_ids)
    return DuplicateGroups(
        exact_group=list(sha256s),
        exact_group_size=exact_sizes,
        near_group=near_group,
        near_group_size=near_sizes,
        near_method=method,
    )
