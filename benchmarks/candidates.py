"""Bytes written per candidate release, against the corpus: full copies vs deletion files.

The script builds one seeded corpus of real images (random crops of the photographs bundled with
scikit-image, PNG-encoded; nothing is downloaded), writes it to a workspace's ``samples`` table,
then creates candidate releases removing 1%, 5% and 20% of the rows (``--repeats`` candidates
each, removed ids drawn at random), two ways side by side on that one corpus:

* full copy (the old way, kept here only as the baseline): each candidate overwrites its release
  table with every kept row, image bytes included, and its ledger manifest lists every kept id;
* deletion files (:func:`diffcurate.storage.releases.create_candidate`): the dataset is copied
  once per ``samples`` version (the base, reported on its own row), each candidate restores
  the base and deletes the removed ids; the ledger stores the base ids once and, per
  candidate, the removed ids and a digest of the kept ids.

Bytes written are measured on disk: the size of the release table's directory before and after
each candidate (data, deletion files, manifests, transactions, tags). Ledger bytes are the
length of each candidate's manifest JSON. Ratios are to the corpus bytes (the ``samples``
table's directory). Nothing here asserts a number.

Usage::

    .venv/bin/python benchmarks/candidates.py                  # 10,000 images, 64x64
    .venv/bin/python benchmarks/candidates.py --n-rows 2000 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DATASET = "bench"
FULL_COPY_TABLE = f"fullcopy_{DATASET}"
FRACTIONS = (0.01, 0.05, 0.20)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (0 if it does not exist yet)."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names
    )


def samples_rows(n_rows: int, size: int, seed: int) -> pa.Table:
    """``samples`` rows for ``n_rows`` distinct real image crops, as ingest writes them."""
    from diffcurate.demo.photos import photo_samples
    from diffcurate.storage.schemas import SAMPLES

    photos = photo_samples(
        heldout=0, n_train=n_rows, secrets=0, near_secrets=0, size=size, seed=seed
    )
    when = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "sample_id": f"{DATASET}:{f.key}",
            "dataset": DATASET,
            "key": f.key,
            "source": "bench",
            "image": f.image,
            "image_format": f.ext,
            "width": size,
            "height": size,
            "sha256": hashlib.sha256(f.image).hexdigest(),
            "phash": "0" * 16,
            "caption": f.caption,
            "metadata": json.dumps(f.metadata),
            "embedding_model": None,
            "image_embedding": None,
            "text_embedding": None,
            "ingest_run_id": "bench",
            "ingested_at": when,
        }
        for f in photos.train
    ]
    return pa.Table.from_pylist(rows, schema=SAMPLES)


def full_copy_candidate(store, ledger, kept: list[str], removed: list[str], n: int) -> int:
    """The old ``create_candidate``, for comparison only (its id checks reduced to the read
    they cost): overwrite a release table with every kept row, tag the version, record a
    manifest listing every kept id. Returns the ledger manifest's bytes."""
    from diffcurate.storage.schemas import SAMPLES

    samples = store.table("samples").to_lance()
    where = f"dataset = '{DATASET}'"
    all_ids = set(samples.to_table(columns=["sample_id"], filter=where)["sample_id"].to_pylist())
    if all_ids != set(kept) | set(removed):
        raise SystemExit("kept and removed ids do not partition the dataset")
    if FULL_COPY_TABLE in store.db.list_tables().tables:
        table = store.db.open_table(FULL_COPY_TABLE)
    else:
        table = store.db.create_table(FULL_COPY_TABLE, schema=SAMPLES)
    keep = pa.array(kept, pa.string())

    def kept_batches() -> Iterator[pa.RecordBatch]:
        for batch in samples.to_batches(filter=where, batch_size=1024):
            mask = pc.is_in(batch.column("sample_id"), value_set=keep)
            yield batch.filter(mask).select(SAMPLES.names).cast(SAMPLES)

    ds = table.to_lance()
    ds.insert(pa.RecordBatchReader.from_batches(SAMPLES, kept_batches()), mode="overwrite")
    tag = f"{DATASET}-candidate-{n}"
    ds.tags.create(tag, ds.version)
    manifest = {
        "dataset": DATASET, "tag": tag, "n": n, "lance_table": FULL_COPY_TABLE,
        "lance_version": int(ds.version), "samples_version": int(samples.version),
        "n_kept": len(kept), "n_removed": len(removed),
        "kept_ids": sorted(kept), "removed_ids": sorted(removed),
        "created_at": datetime.now(UTC).isoformat(), "created_by": "bench",
    }  # fmt: skip
    ledger.record_release(
        tag=tag, dataset=DATASET, n=n, kind="candidate", lance_table=FULL_COPY_TABLE,
        lance_version=int(ds.version), n_kept=len(kept), n_removed=len(removed),
        manifest=manifest, created_by="bench",
    )  # fmt: skip
    return len(json.dumps(ledger.release(tag)["manifest"]))


@dataclass
class Row:
    way: str
    fraction: float
    removed: int
    bytes_written: int
    ledger_bytes: int
    seconds: float


def run(root: Path, n_rows: int, size: int, repeats: int, seed: int) -> tuple[list[Row], dict]:
    from diffcurate.storage import releases as rel
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.storage.ledger import Ledger

    lance_dir = root / "lancedb"
    store = LanceStore(str(lance_dir))
    ledger = Ledger(root / "ledger.duckdb")
    full_ledger = Ledger(root / "ledger-full-copy.duckdb")
    started = time.perf_counter()
    store.insert_new("samples", samples_rows(n_rows, size, seed))
    info = {
        "corpus_bytes": dir_bytes(lance_dir / "samples.lance"),
        "build_seconds": time.perf_counter() - started,
    }
    ids = sorted(store.read("samples", columns=["sample_id"])["sample_id"].to_pylist())
    rng = np.random.default_rng(seed)
    release_dir = lance_dir / f"{rel.release_table_name(DATASET)}.lance"
    full_dir = lance_dir / f"{FULL_COPY_TABLE}.lance"
    rows: list[Row] = []

    def candidate(n: int, fraction: float, n_removed: int) -> None:
        removed_set = set(rng.choice(ids, n_removed, replace=False).tolist())
        kept = [i for i in ids if i not in removed_set]
        removed = sorted(removed_set)

        before, t0 = dir_bytes(full_dir), time.perf_counter()
        ledger_bytes = full_copy_candidate(store, full_ledger, kept, removed, n)
        rows.append(Row("full copy", fraction, len(removed), dir_bytes(full_dir) - before,
                        ledger_bytes, time.perf_counter() - t0))  # fmt: skip

        before, t0 = dir_bytes(release_dir), time.perf_counter()
        cand = rel.create_candidate(store, ledger, DATASET, kept, removed, created_by="bench")
        seconds = time.perf_counter() - t0
        manifest = ledger.release(cand.tag)["manifest"]
        rows.append(Row("deletion files", fraction, len(removed), dir_bytes(release_dir) - before,
                        len(json.dumps(manifest)), seconds))  # fmt: skip
        got = rel.checkout(store, ledger, cand.tag, columns=["sample_id"])["sample_id"]
        if sorted(got.to_pylist()) != kept:
            raise SystemExit(f"{cand.tag} does not hold exactly the kept rows")

    # The first candidate of a samples version also makes the base copy: measured on its own.
    candidate(1, 0.0, 1)
    n = 1
    for fraction in FRACTIONS:
        for _ in range(repeats):
            n += 1
            candidate(n, fraction, round(fraction * len(ids)))
    return rows, info


def report(rows: Sequence[Row], info: dict, args: argparse.Namespace) -> str:
    corpus = info["corpus_bytes"]
    full = [r for r in rows if r.way == "full copy"]
    new = [r for r in rows if r.way != "full copy"]
    out = [
        "# diffcurate candidate-release storage benchmark",
        "",
        f"command: `{shlex.join(['.venv/bin/python', 'benchmarks/candidates.py', *sys.argv[1:]])}`",
        "",
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start "
        f"{' / '.join(f'{x:.2f}' for x in args.load)}",
        "",
        f"corpus: {args.n_rows:,} distinct real {args.size}x{args.size} photo crops (PNG), "
        f"`samples` table {corpus:,} bytes on disk; built in {info['build_seconds']:.1f} s",
        "",
        "The first candidate of a samples version removes 1 row; for deletion files it also "
        "makes the base copy (and stores the base ids in its ledger manifest).",
        "",
        "| candidate | way | removed rows | bytes written / corpus | bytes per removed row "
        "| ledger manifest bytes | seconds ratio (full copy / this) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for f, d in zip(full, new, strict=True):
        what = "first (base copy)" if f.fraction == 0 else f"{f.fraction:.0%} removed"
        for r in (f, d):
            out.append(
                f"| {what} | {r.way} | {r.removed:,} | {r.bytes_written / corpus:.5f} "
                f"| {r.bytes_written / r.removed:,.1f} | {r.ledger_bytes:,} "
                f"| {f.seconds / r.seconds:.2f} |"
            )
    out += [
        "",
        "## Per removed fraction (sums over its candidates)",
        "",
        "| removed | full copy bytes / deletion-file bytes | deletion-file bytes / corpus "
        "| deletion-file bytes per removed row | full copy ledger / deletion-file ledger |",
        "|---:|---:|---:|---:|---:|",
    ]
    for fraction in FRACTIONS:
        f = [r for r in full if r.fraction == fraction]
        d = [r for r in new if r.fraction == fraction]
        fb, db = sum(r.bytes_written for r in f), sum(r.bytes_written for r in d)
        fl, dl = sum(r.ledger_bytes for r in f), sum(r.ledger_bytes for r in d)
        out.append(
            f"| {fraction:.0%} | {fb / db:,.1f} | {db / len(d) / corpus:.5f} "
            f"| {db / sum(r.removed for r in d):,.1f} | {fl / dl:,.1f} |"
        )
    total_full = sum(r.bytes_written for r in full)
    total_new = sum(r.bytes_written for r in new)
    out += [
        "",
        f"all {len(full)} candidates, base copy included: full copy {total_full / corpus:.2f} x "
        f"corpus, deletion files {total_new / corpus:.2f} x corpus "
        f"(ratio {total_full / total_new:.1f})",
    ]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-rows", type=int, default=10_000, help="corpus size (images)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=2, help="candidates per removed fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the workspace here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.load = os.getloadavg()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows, info = run(args.workdir, args.n_rows, args.size, args.repeats, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="diffcurate-candidates-") as tmp:
            rows, info = run(Path(tmp), args.n_rows, args.size, args.repeats, args.seed)
    print(report(rows, info, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
