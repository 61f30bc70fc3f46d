"""End-to-end ingest through the Prefect flow, against a real LanceDB workspace."""

import json

import numpy as np
import pytest

from diffcurate.config import ClipSettings, IngestSettings
from diffcurate.demo.writers import SampleFile, write_folder, write_manifest, write_webdataset
from diffcurate.flows.ingest import IngestParams, ingest_flow
from diffcurate.ingest.records import sample_id_for
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from imagebytes import jpeg_bytes, png_bomb_bytes

pytestmark = pytest.mark.usefixtures("prefect_harness")

RUN_SPECIFIC = {"source", "ingest_run_id", "ingested_at"}


def run(source, workspace, dataset="d", clip=None, **ingest):
    return ingest_flow(
        IngestParams(
            source=source,
            dataset=dataset,
            workspace=workspace,
            clip=clip or ClipSettings(),
            ingest=IngestSettings(**{"batch_size": 16, **ingest}),
            progress=False,
        )
    )


def rows_by_id(workspace, table="samples"):
    t = LanceStore(str(workspace / "lancedb")).read(table)
    key = "sample_id" if table == "samples" else "quarantine_id"
    return {r[key]: r for r in t.to_pylist()}


def test_webdataset_and_parquet_give_identical_rows(tmp_path, corpus_files, tiny_clip):
    shards = write_webdataset(corpus_files, tmp_path / "wds", shard_size=20)
    manifest = write_manifest(corpus_files, tmp_path / "m.parquet")
    a = run(shards[0].parent, tmp_path / "ws-a", clip=tiny_clip)
    b = run(manifest, tmp_path / "ws-b", clip=tiny_clip)
    assert a.ingested == b.ingested == len(corpus_files)
    ra, rb = rows_by_id(tmp_path / "ws-a"), rows_by_id(tmp_path / "ws-b")
    assert set(ra) == set(rb) == {sample_id_for("d", f.key) for f in corpus_files}
    for sid in ra:
        for col in ra[sid].keys() - RUN_SPECIFIC:
            assert ra[sid][col] == rb[sid][col], col
    f = corpus_files[0]
    row = ra[sample_id_for("d", f.key)]
    assert row["image"] == f.image and row["caption"] == f.caption
    assert json.loads(row["metadata"]) == f.metadata
    assert len(row["image_embedding"]) == 32 and row["embedding_model"].startswith("diffcurate")
    assert a.embeddings == row["embedding_model"]


def test_reingest_adds_nothing_and_ledger_records_both_runs(tmp_path, corpus_files):
    files = [*corpus_files, SampleFile("empty", b"", "jpg", "nothing here")]
    write_folder(files, tmp_path / "src")
    ws = tmp_path / "ws"
    first = run(tmp_path / "src", ws)
    n_samples, n_quar = len(rows_by_id(ws)), len(rows_by_id(ws, "quarantine"))
    second = run(tmp_path / "src", ws)
    assert (first.ingested, first.quarantined) == (len(corpus_files), 1)
    assert (second.ingested, second.already_present, second.quarantine_new) == (
        0, len(corpus_files), 0,
    )  # fmt: skip
    assert (len(rows_by_id(ws)), len(rows_by_id(ws, "quarantine"))) == (n_samples, n_quar)
    runs = Ledger(ws / "ledger.duckdb").runs(kind="ingest")
    assert [r.run_id for r in runs] == [second.run_id, first.run_id]
    assert all(r.status == "completed" for r in runs)
    assert runs[1].stats["ingested"] == len(corpus_files)
    assert runs[1].stats["quarantined_by_reason"] == {"empty_file": 1}


def test_every_bad_input_is_quarantined_and_nothing_else_lost(tmp_path, digit_files):
    good = digit_files[:10]
    img = good[0].image
    bad = {
        "truncated": SampleFile("truncated", jpeg_bytes(np.zeros((32, 32, 3), np.uint8))[:200],
                                "jpg", "cut short"),
        "zero": SampleFile("zero", b"", "png", "empty file"),
        "text": SampleFile("text", b"definitely not an image", "jpg", "a text file"),
        "bomb": SampleFile("bomb", png_bomb_bytes(), "png", "a bomb"),
        "blank": SampleFile("blank", img, "png", "   "),
        "tiny": SampleFile("tiny", jpeg_bytes(np.zeros((4, 4, 3), np.uint8)), "jpg", "too small"),
    }  # fmt: skip
    src = tmp_path / "src"
    write_folder(good + list(bad.values()), src)
    (src / "nocaption.png").write_bytes(img)
    (src / "latin.png").write_bytes(img)
    (src / "latin.txt").write_bytes("légende".encode("latin-1"))
    ws = tmp_path / "ws"
    summary = run(src, ws, batch_size=4)
    assert summary.ingested == len(good)
    assert summary.quarantined_by_reason == {
        "caption_empty": 1,
        "caption_missing": 1,
        "caption_not_utf8": 1,
        "corrupt_image": 1,
        "decompression_bomb": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "size_out_of_bounds": 1,
    }
    quarantine = {r["key"]: r for r in rows_by_id(ws, "quarantine").values()}
    assert quarantine["latin"]["caption_raw"] == "légende".encode("latin-1")
    assert quarantine["bomb"]["image"] == png_bomb_bytes()  # kept, so nothing is lost
    assert quarantine["tiny"]["detail"].startswith("failed expect_column_values_to_be_between")
    assert {r["key"] for r in rows_by_id(ws).values()} == {f.key for f in good}


def test_duplicate_ids_first_wins_across_shards_and_key_conflicts_never_overwrite(
    tmp_path, digit_files
):
    a, b = digit_files[0], digit_files[1]
    rows = [a, *list(digit_files[2:20]), SampleFile(a.key, b.image, "png", "same key again")]
    write_manifest(rows, tmp_path / "m.parquet")
    ws = tmp_path / "ws"
    s1 = run(tmp_path / "m.parquet", ws, batch_size=5)
    assert (s1.ingested, s1.quarantined_by_reason) == (19, {"duplicate_id": 1})
    stored = rows_by_id(ws)[sample_id_for("d", a.key)]
    assert stored["image"] == a.image
    # A later source that changes the bytes behind a known key is refused, not applied.
    write_manifest([SampleFile(a.key, b.image, "png", "changed")], tmp_path / "m2.parquet")
    s2 = run(tmp_path / "m2.parquet", ws)
    assert s2.quarantined_by_reason == {"key_conflict": 1} and s2.nothing_ingested
    assert rows_by_id(ws)[sample_id_for("d", a.key)]["image"] == a.image


def test_duplicate_groups_are_recorded(tmp_path, digit_files, tiny_clip):
    # digit_files holds 3 extra byte-identical copies of digit 5.
    write_webdataset(digit_files, tmp_path / "wds")
    ws = tmp_path / "ws"
    summary = run(tmp_path / "wds", ws, clip=tiny_clip)
    assert summary.duplicates["exact_groups"] == 1 and summary.duplicates["exact_rows"] == 4
    dups = LanceStore(str(ws / "lancedb")).read("duplicates").to_pylist()
    assert len(dups) == len(digit_files)
    big = [d for d in dups if d["exact_group_size"] == 4]
    assert {d["sample_id"] for d in big} == {
        sample_id_for("d", k) for k in [digit_files[5].key, "dup-0", "dup-1", "dup-2"]
    }
    assert len({d["near_group"] for d in big}) == 1 and big[0]["near_group_size"] >= 4
    assert big[0]["near_method"] == "phash+clip"


def test_partial_ingest_then_full_completes_without_duplicates(tmp_path, digit_files):
    # What a resumed run sees: part of the source already committed by an earlier run.
    write_manifest(digit_files[:25], tmp_path / "part.parquet")
    write_manifest(digit_files, tmp_path / "full.parquet")
    ws = tmp_path / "ws"
    run(tmp_path / "part.parquet", ws)
    s = run(tmp_path / "full.parquet", ws)
    assert (s.already_present, s.ingested) == (25, len(digit_files) - 25)
    assert len(rows_by_id(ws)) == len(digit_files)


def test_embeddings_disabled_is_explicit(tmp_path, digit_files):
    write_manifest(digit_files[:3], tmp_path / "m.parquet")
    s = run(tmp_path / "m.parquet", tmp_path / "ws")
    assert s.embeddings == "disabled"
    rows = rows_by_id(tmp_path / "ws").values()
    assert all(r["image_embedding"] is None and r["embedding_model"] is None for r in rows)


def _mixed_source(tmp_path, digit_files):
    """Good rows, every kind of bad row, a key repeated across shards, a key already stored
    with other bytes (conflict) and keys already stored (present)."""
    a, b = digit_files[0], digit_files[1]
    bad = [
        SampleFile("truncated", jpeg_bytes(np.zeros((32, 32, 3), np.uint8))[:200], "jpg", "cut"),
        SampleFile("zero", b"", "png", "empty file"),
        SampleFile("text", b"definitely not an image", "jpg", "a text file"),
        SampleFile("bomb", png_bomb_bytes(), "png", "a bomb"),
        SampleFile("blank", a.image, "png", "   "),
        SampleFile("tiny", jpeg_bytes(np.zeros((4, 4, 3), np.uint8)), "jpg", "too small"),
    ]
    rows = [
        *digit_files[:20],
        *bad,
        *digit_files[20:40],
        SampleFile(a.key, b.image, "png", "again"),
    ]
    write_manifest(digit_files[40:45], tmp_path / "before.parquet")
    changed = SampleFile(digit_files[44].key, b.image, "png", "changed")
    write_manifest([*rows, *digit_files[40:44], changed], tmp_path / "m.parquet")
    return tmp_path / "before.parquet", tmp_path / "m.parquet"


def _contents(ws):
    samples = {k: {c: v for c, v in r.items() if c not in RUN_SPECIFIC}
               for k, r in rows_by_id(ws).items()}  # fmt: skip
    quarantine = {k: (r["key"], r["reason"], r["detail"], r["sample_id"])
                  for k, r in rows_by_id(ws, "quarantine").items()}  # fmt: skip
    return samples, quarantine


def test_worker_processes_give_the_same_rows_as_the_flow_alone(tmp_path, digit_files, tiny_clip):
    before, source = _mixed_source(tmp_path, digit_files)
    got = {}
    for workers in (1, 2):
        ws = tmp_path / f"ws-{workers}"
        run(before, ws, clip=tiny_clip)
        summary = ingest_flow(IngestParams(source=source, dataset="d", workspace=ws,
                                           clip=tiny_clip, ingest=IngestSettings(batch_size=8),
                                           progress=False, workers=workers))  # fmt: skip
        got[workers] = (summary, *_contents(ws))
    (s1, rows1, quar1), (s2, rows2, quar2) = got[1], got[2]
    assert (s2.workers, s1.workers) == (2, 1)
    assert rows1 == rows2 and quar1 == quar2
    assert len(rows1) == 45 and s1.ingested == s2.ingested == 40
    assert s1.already_present == s2.already_present == 4
    assert s1.quarantined_by_reason == s2.quarantined_by_reason == {
        "caption_empty": 1, "corrupt_image": 1, "decompression_bomb": 1, "duplicate_id": 1,
        "empty_file": 1, "key_conflict": 1, "not_an_image": 1, "size_out_of_bounds": 1,
    }  # fmt: skip
    assert all(len(r["image_embedding"]) == 32 for r in rows2.values())
