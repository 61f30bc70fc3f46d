"""What the pages show, read from the ledger and LanceDB of one workspace.

All ledger and Lance access of the app goes through :class:`DashboardData`, which serialises it
with one lock (DuckDB refuses a read-only and a read-write connection to one file open at the
same time in one process) and caches per-dataset lookup arrays keyed by the ``samples`` table
version, so a page costs a few vectorised operations, not a table scan per image.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffcurate.dashboards.thumbs import ThumbCache, thumbnail_png
from diffcurate.ingest.dedup import phash_to_uint64
from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger, RunRecord
from diffcurate.storage.users import UserStore
from diffcurate.workspace import Workspace

NEIGHBOURS = 3


class NotFound(LookupError):
    """An id that names nothing in this workspace."""


@dataclass
class SampleIndex:
    """Lookup arrays of one dataset's samples (one ``samples`` version)."""

    ids: list[str]
    pos: dict[str, int]
    keys: list[str]
    captions: list[str]
    phash: np.ndarray  # uint64 per sample
    embeddings: np.ndarray | None  # L2-normalised CLIP image embeddings, when all have one
    group: np.ndarray  # exact-duplicate group number per sample
    group_size: np.ndarray

    def members(self, sample_id: str) -> list[str]:
        g = self.group[self.pos[sample_id]]
        return [self.ids[i] for i in np.flatnonzero(self.group == g)]

    def neighbours(self, sample_id: str, k: int = NEIGHBOURS) -> list[tuple[str, str]]:
        """The ``k`` nearest other images (copies excluded): ``(id, distance label)``."""
        i = self.pos[sample_id]
        other = self.group != self.group[i]
        if self.embeddings is not None:
            sim = self.embeddings @ self.embeddings[i]
            sim = np.where(other, sim, -np.inf)
            order = np.argsort(-sim, kind="stable")[:k]
            return [(self.ids[j], f"cos {sim[j]:.3f}") for j in order if other[j]]
        dist = np.bitwise_count(self.phash ^ self.phash[i]).astype(np.int64)
        dist = np.where(other, dist, 1 << 30)
        order = np.argsort(dist, kind="stable")[:k]
        return [(self.ids[j], f"pHash {dist[j]}/64") for j in order if other[j]]


@dataclass
class Tile:
    """One flagged image (an exact-duplicate group) in the review grid."""

    sample_id: str
    key: str
    caption: str
    score: float
    rank: int
    copies: int
    group_ids: list[str]
    neighbours: list[tuple[str, str, bool]]  # id, distance, removed in the candidate
    mark: dict[str, Any] | None = None


@dataclass
class FlaggedPage:
    tiles: list[Tile]
    page: int
    pages: int
    total: int
    per_page: int
    thumbs: list[str] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)


class DashboardData:
    """Read access (and the few ledger writes) of one workspace."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)
        self.layout = Workspace(self.workspace)
        self.ledger = Ledger(self.layout.ledger_path)
        self.store = LanceStore.open(self.layout)
        self.users = UserStore(self.ledger.path)
        self.lock = threading.RLock()
        self.thumbs = ThumbCache()
        self._indexes: OrderedDict[tuple[str, int], SampleIndex] = OrderedDict()
        self._ids: OrderedDict[str, dict[str, list[str]]] = OrderedDict()

    # Runs -------------------------------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        with self.lock:
            return self.ledger.runs()

    def run(self, run_id: str) -> RunRecord:
        with self.lock:
            try:
                return self.ledger.run(run_id)
            except KeyError:
                raise NotFound(run_id) from None

    def release_status(self) -> dict[str, rel.ReleaseInfo]:
        with self.lock:
            return {i.tag: i for i in rel.list_releases(self.ledger)}

    def release_problems(self) -> dict[str, str]:
        """Tags whose Lance tag no longer matches the ledger (:func:`~.releases.tag_problems`)."""
        with self.lock:
            return rel.tag_problems(self.store, self.ledger)

    def chain_problems(self) -> list[str]:
        """What is wrong with the ledger's decisions hash chain (empty when it verifies)."""
        with self.lock:
            return self.ledger.decision_chain_problems()

    # Samples ----------------------------------------------------------------------------
    def index(self, dataset: str) -> SampleIndex:
        with self.lock:
            version = int(self.store.table("samples").version)
            key = (dataset, version)
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
            t = self.store.read("samples", dataset, columns=[
                "sample_id", "key", "caption", "phash", "image_embedding"])  # fmt: skip
            ids = t.column("sample_id").to_pylist()
            emb_col = t.column("image_embedding").to_pylist()
            embeddings = None
            if ids and all(e for e in emb_col) and len({len(e) for e in emb_col}) == 1:
                embeddings = np.asarray(emb_col, dtype=np.float32)
                embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-12
            group_name = dict.fromkeys(ids, "")
            dup = self.store.read("duplicates", dataset, columns=["sample_id", "exact_group"])
            for sid, g in zip(dup.column("sample_id").to_pylist(),
                              dup.column("exact_group").to_pylist(), strict=True):  # fmt: skip
                if sid in group_name:
                    group_name[sid] = g
            names = [group_name[s] or f"self:{s}" for s in ids]
            _, group, counts = np.unique(names, return_inverse=True, return_counts=True)
            index = SampleIndex(
                ids=ids, pos={s: i for i, s in enumerate(ids)}, keys=t.column("key").to_pylist(),
                captions=t.column("caption").to_pylist(),
                phash=phash_to_uint64(t.column("phash").to_pylist()), embeddings=embeddings,
                group=group, group_size=counts[group],
            )  # fmt: skip
            self._indexes[key] = index
            while len(self._indexes) > 4:
                self._indexes.popitem(last=False)
            return index

    def thumbnail(self, sample_id: str) -> bytes:
        cached = self.thumbs.get(sample_id)
        if cached is not None:
            return cached
        self.prefetch([sample_id])
        cached = self.thumbs.get(sample_id)
        if cached is None:
            raise NotFound(sample_id)
        return cached

    def prefetch(self, sample_ids: list[str]) -> None:
        """Render the thumbnails of ``sample_ids`` into the cache with one table read."""
        missing = [s for s in dict.fromkeys(sample_ids) if self.thumbs.get(s) is None]
        if not missing:
            return
        with self.lock:
            t = self.store.read("samples", columns=["sample_id", "image"],
                                where={"sample_id": missing})  # fmt: skip
        for sid, blob in zip(t.column("sample_id").to_pylist(), t.column("image"), strict=True):
            self.thumbs.put(sid, thumbnail_png(blob.as_py()))

    # Hygiene runs -----------------------------------------------------------------------
    def candidate(self, tag: str) -> dict[str, Any]:
        with self.lock:
            try:
                return self.ledger.release(tag)
            except KeyError:
                raise NotFound(tag) from None

    def manifest_ids(self, tag: str) -> dict[str, list[str]]:
        """Kept and removed ids of a tag (cached: a tag's manifest never changes)."""
        with self.lock:
            if tag not in self._ids:
                try:
                    self._ids[tag] = rel.manifest_ids(self.ledger, tag)
                except rel.ReleaseNotFound:
                    raise NotFound(tag) from None
                while len(self._ids) > 16:
                    self._ids.popitem(last=False)
            return self._ids[tag]

    def scores(self, score_run: str) -> dict[str, float]:
        with self.lock:
            t = self.store.read("scores", columns=["sample_id", "score"],
                                where={"run_id": score_run})  # fmt: skip
        return dict(zip(t.column("sample_id").to_pylist(), t.column("score").to_pylist(),
                        strict=True))  # fmt: skip

    def distinct_scores(self, run: RunRecord) -> tuple[list[float], list[bool]]:
        """One score per distinct image (exact-duplicate group: its riskiest copy, as the flag
        step ranks them) and whether the run flagged it."""
        stats = run.stats
        scores = self.scores(stats.get("score_run", "")) if stats.get("score_run") else {}
        tag = stats.get("release_tag")
        removed = set(self.manifest_ids(tag)["removed"]) if tag else set()
        index = self.index(run.dataset)
        best: dict[Any, tuple[float, bool]] = {}
        for sid, score in scores.items():
            group = int(index.group[index.pos[sid]]) if sid in index.pos else sid
            top, flagged = best.get(group, (-math.inf, False))
            best[group] = (max(top, score), flagged or sid in removed)
        return [b[0] for b in best.values()], [b[1] for b in best.values()]

    def scorer_of(self, score_run: str) -> str:
        """The scorer (signal) a score run actually used, as its ledger row records it."""
        try:
            run = self.run(score_run)
        except NotFound:
            return "risk"
        params, stats = run.params, run.stats
        scorer = params.get("scorer") if isinstance(params.get("scorer"), dict) else {}
        return str(stats.get("signal") or scorer.get("signal") or params.get("signal") or "risk")

    def per_layer(self, score_run: str, flagged: set[str]) -> dict[str, Any] | None:
        """Mean per-layer score parts over all samples and over flagged ones, with names."""
        with self.lock:
            t = self.store.read("scores", columns=["sample_id", "per_layer"],
                                where={"run_id": score_run})  # fmt: skip
            try:
                names = self.ledger.run(score_run).stats.get("layer_names") or []
            except KeyError:
                names = []
        parts = t.column("per_layer").to_pylist()
        if not parts or any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
            return None
        arr = np.asarray(parts, dtype=np.float64)
        mask = np.array([s in flagged for s in t.column("sample_id").to_pylist()])
        names = list(names) if len(names) == arr.shape[1] else [
            f"layer {i}" for i in range(arr.shape[1])]  # fmt: skip
        return {"names": names, "all": arr.mean(axis=0).tolist(),
                "flagged": arr[mask].mean(axis=0).tolist() if mask.any() else None}  # fmt: skip

    def marks(self, tag: str) -> list[dict[str, Any]]:
        with self.lock:
            return reviews.marks(self.ledger, tag)

    def flagged_page(self, run: RunRecord, page: int, per_page: int) -> FlaggedPage:
        """One page of the run's flagged images, riskiest first, one tile per duplicate group."""
        stats = run.stats
        tag = stats.get("release_tag")
        if not tag:
            return FlaggedPage([], 1, 1, 0, per_page)
        removed = self.manifest_ids(tag)["removed"]
        removed_set = set(removed)
        scores = self.scores(stats.get("score_run", ""))
        index = self.index(run.dataset)
        groups: dict[int, list[str]] = {}
        for sid in removed:
            if sid in index.pos:
                groups.setdefault(int(index.group[index.pos[sid]]), []).append(sid)
        reps = []
        for members in groups.values():
            best = max(members, key=lambda s: (scores.get(s, -math.inf), s))
            reps.append((scores.get(best, math.nan), best, sorted(members)))
        reps.sort(key=lambda r: (-r[0] if not math.isnan(r[0]) else math.inf, r[1]))
        total = len(reps)
        pages = max(1, math.ceil(total / per_page))
        page = min(max(1, page), pages)
        effective = reviews.effective_marks(self.marks(tag))
        tiles, thumbs = [], []
        for rank, (score, sid, members) in enumerate(
            reps[(page - 1) * per_page : page * per_page], start=(page - 1) * per_page + 1
        ):
            i = index.pos[sid]
            near = [(n, d, n in removed_set) for n, d in index.neighbours(sid)]
            tiles.append(Tile(
                sample_id=sid, key=index.keys[i], caption=index.captions[i], score=score,
                rank=rank, copies=int(index.group_size[i]), group_ids=members, neighbours=near,
                mark=effective.get(sid),
            ))  # fmt: skip
            thumbs += [sid] + [n for n, _, _ in near]
        self.prefetch(thumbs)
        return FlaggedPage(tiles, page, pages, total, per_page, thumbs, removed_set)

    def gate_image_path(self, run: RunRecord, phase: str, secret_id: str) -> Path:
        """The saved closest generation of one secret (inside the run's gate directory)."""
        if secret_id not in (run.stats.get("secrets") or []):
            raise NotFound(secret_id)
        base = self.layout.gate_dir(run.run_id).resolve()
        stored = run.stats.get("gate_images") or ""
        if stored and not (base / phase).is_dir():
            base = Path(stored).resolve()
        path = (base / phase / f"{secret_id}.png").resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise NotFound(secret_id)
        return path

    def manifest_json(self, tag: str) -> str:
        return json.dumps(self.candidate(tag)["manifest"], indent=2, sort_keys=True, default=str)
