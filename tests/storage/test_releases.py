"""Releases: tagged Lance versions of kept samples, immutable release tags, ledger manifests."""

import hashlib
import json
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest

from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SAMPLES


def sample_rows(files, dataset: str) -> pa.Table:
    """``samples`` rows for real digit images, as ingest writes them. Embeddings are
    variable-length (or absent) as when datasets are embedded by different CLIP models."""
    rows = [
        {
            "sample_id": f"{dataset}:{f.key}",
            "dataset": dataset,
            "key": f.key,
            "source": "test",
            "image": f.image,
            "image_format": f.ext,
            "width": 8,
            "height": 8,
            "sha256": hashlib.sha256(f.image).hexdigest(),
            "phash": "0" * 16,
            "caption": f.caption,
            "metadata": json.dumps(f.metadata),
            "embedding_model": None if i % 3 == 0 else f"clip-{i % 3}",
            "image_embedding": None if i % 3 == 0 else [i / 10] * (2 + i % 3),
            "text_embedding": None if i % 3 == 0 else [-i / 10] * (2 + i % 3),
            "ingest_run_id": "ingest-1",
            "ingested_at": datetime(2026, 1, 1, tzinfo=UTC),
        }
        for i, f in enumerate(files)
    ]
    return pa.Table.from_pylist(rows, schema=SAMPLES)


@pytest.fixture
def env(tmp_path, digit_files):
    store = LanceStore(str(tmp_path / "lancedb"))
    store.insert_new("samples", sample_rows(digit_files[:20], "digits"))
    store.insert_new("samples", sample_rows(digit_files[20:30], "other"))
    return store, Ledger(tmp_path / "ledger.duckdb")


def ids(store, dataset="digits"):
    return sorted(
        store.read("samples", dataset=dataset, columns=["sample_id"])["sample_id"].to_pylist()
    )


def split(store, n_removed=3, dataset="digits"):
    all_ids = ids(store, dataset)
    return all_ids[n_removed:], all_ids[:n_removed]


def all_lance_tags(store, dataset="digits"):
    table = store.db.open_table(rel.release_table_name(dataset))
    return {t: int(v["version"]) for t, v in table.tags.list().items()}


def lance_tags(store, dataset="digits"):
    """The candidate and release tags (not the base tags candidates are cut from)."""
    return {t: v for t, v in all_lance_tags(store, dataset).items() if "-base-" not in t}


def test_candidate_tag_holds_exactly_the_kept_rows_and_samples_is_unchanged(env):
    store, ledger = env
    samples_before = store.read("samples").sort_by("sample_id")
    version_before = store.table("samples").version
    kept, removed = split(store)
    info = rel.create_candidate(store, ledger, "digits", kept, removed,
                                {"runs": {"score": "score-1"}, "gate_passed": True})  # fmt: skip
    assert info.tag == "digits-candidate-1" and info.kind == "candidate"
    assert (info.n, info.n_kept, info.n_removed, info.status) == (1, 17, 3, "pending")
    base = rel.base_tag_name("digits", version_before)
    assert all_lance_tags(store) == {"digits-candidate-1": info.lance_version,
                                     base: all_lance_tags(store)[base]}  # fmt: skip
    assert store.db.open_table("release_digits").schema == SAMPLES
    rows = rel.checkout(store, ledger, info.tag)
    assert sorted(rows["sample_id"].to_pylist()) == kept
    # Kept rows are full copies (image bytes included) of the samples rows.
    by_id = {r["sample_id"]: r for r in samples_before.to_pylist()}
    assert all(r == by_id[r["sample_id"]] for r in rows.to_pylist())
    # samples: same version, same rows.
    assert store.table("samples").version == version_before
    assert store.read("samples").sort_by("sample_id").equals(samples_before)
    assert store.count("samples") == 30
    rel.verify(store, ledger, info.tag)


def test_n_increments_per_dataset_and_old_candidates_stay_readable(env, monkeypatch):
    store, ledger = env
    monkeypatch.setattr(rel, "_READ_BATCH", 4)  # rows are streamed in several batches
    kept1, removed1 = split(store, 3)
    kept2, removed2 = split(store, 5)
    c1 = rel.create_candidate(store, ledger, "digits", kept1, removed1)
    c2 = rel.create_candidate(store, ledger, "digits", kept2, removed2)
    o1 = rel.create_candidate(store, ledger, "other", *split(store, 1, "other"))
    assert [c1.tag, c2.tag, o1.tag] == ["digits-candidate-1", "digits-candidate-2",
                                        "other-candidate-1"]  # fmt: skip
    assert c2.lance_version > c1.lance_version
    assert sorted(rel.checkout(store, ledger, c1.tag)["sample_id"].to_pylist()) == kept1
    assert sorted(rel.checkout(store, ledger, c2.tag)["sample_id"].to_pylist()) == kept2
    assert rel.checkout(store, ledger, o1.tag).num_rows == 9
    assert [r.tag for r in rel.list_releases(ledger, "digits")] == [c1.tag, c2.tag]
    assert len(rel.list_releases(ledger)) == 3


def test_approve_tags_the_same_version_as_release(env):
    store, ledger = env
    kept, removed = split(store)
    cand = rel.create_candidate(store, ledger, "digits", kept, removed)
    out = rel.approve(store, ledger, cand.tag, actor="ann", comment="looks good")
    assert out.tag == "digits-release-1" and out.kind == "release" and out.status == "released"
    assert lance_tags(store) == {cand.tag: cand.lance_version, out.tag: cand.lance_version}
    assert out.lance_version == cand.lance_version
    assert sorted(rel.checkout(store, ledger, out.tag)["sample_id"].to_pylist()) == kept
    assert rel.show(ledger, cand.tag).status == "approved"
    shown = rel.show_release(ledger, out.tag)
    assert shown["manifest"]["candidate"] == cand.tag
    assert [(d["action"], d["actor"], d["comment"]) for d in shown["decisions"]] == [
        ("approve", "ann", "looks good")
    ]
    rel.verify(store, ledger, out.tag)


def test_release_tags_cannot_be_moved_or_overwritten(env):
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    rel.approve(store, ledger, cand.tag, actor="ann")
    newer = rel.create_candidate(store, ledger, "digits", *split(store, 6))
    before = lance_tags(store)

    with pytest.raises(rel.ReleaseError, match="already approved"):
        rel.approve(store, ledger, cand.tag, actor="bob")
    with pytest.raises(rel.ReleaseError, match="already approved"):
        rel.reject(store, ledger, cand.tag, actor="bob")
    with pytest.raises(rel.ReleaseError, match="is a release, not a candidate"):
        rel.approve(store, ledger, "digits-release-1", actor="bob")
    # Lance itself refuses a second tag of the same name (what approve relies on).
    table = store.db.open_table("release_digits")
    with pytest.raises(RuntimeError, match="already exists"):
        table.tags.create("digits-release-1", newer.lance_version)
    # Neither the ledger record can be written twice.
    with pytest.raises(ValueError, match="already recorded"):
        ledger.record_release(tag="digits-release-1", dataset="digits", n=1, kind="release",
                              lance_table="release_digits", lance_version=newer.lance_version,
                              n_kept=1, n_removed=0, manifest={}, created_by="x")  # fmt: skip
    assert lance_tags(store) == before
    assert ledger.release("digits-release-1")["lance_version"] == cand.lance_version
    assert [d["action"] for d in ledger.decisions(cand.tag)] == ["approve"]

    # A tag moved behind diffcurate's back (Lance's own update) is detected, not trusted.
    table.tags.update("digits-release-1", newer.lance_version)
    with pytest.raises(rel.ReleaseIntegrityError, match="moved outside diffcurate"):
        rel.checkout(store, ledger, "digits-release-1")
    with pytest.raises(rel.ReleaseIntegrityError):
        rel.verify(store, ledger, "digits-release-1")


def test_rejection_records_the_decision_and_leaves_no_release_tag(env):
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store))
    out = rel.reject(store, ledger, cand.tag, actor="bob", comment="audit failed")
    assert out.status == "rejected"
    assert lance_tags(store) == {cand.tag: cand.lance_version}
    assert [r.tag for r in rel.list_releases(ledger)] == [cand.tag]
    with pytest.raises(rel.ReleaseError, match="already rejected"):
        rel.approve(store, ledger, cand.tag, actor="ann")
    with pytest.raises(rel.ReleaseError, match="already rejected"):
        rel.reject(store, ledger, cand.tag, actor="ann")
    assert lance_tags(store) == {cand.tag: cand.lance_version}
    assert [(d["action"], d["actor"]) for d in ledger.decisions(cand.tag)] == [("reject", "bob")]
    with pytest.raises(rel.ReleaseNotFound):
        rel.show(ledger, "digits-release-1")


def test_failed_gate_needs_an_explicit_override_with_a_comment(env):
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store), {"gate_passed": False})
    with pytest.raises(rel.ReleaseError, match="failed its gates"):
        rel.approve(store, ledger, cand.tag, actor="ann")
    with pytest.raises(rel.ReleaseError, match="needs a comment"):
        rel.approve(store, ledger, cand.tag, actor="ann", override=True)
    with pytest.raises(rel.ReleaseError, match="only the 'approver' role"):
        rel.approve(store, ledger, cand.tag, actor="rev", role="reviewer")
    assert lance_tags(store) == {cand.tag: cand.lance_version}
    rel.approve(store, ledger, cand.tag, actor="ann", comment="FD noise", override=True)
    assert [d["action"] for d in ledger.decisions(cand.tag)] == ["override", "approve"]
    assert "digits-release-1" in lance_tags(store)


def test_manifest_is_queryable_with_duckdb(env):
    store, ledger = env
    kept, removed = split(store, 4)
    extra = {"runs": {"score": "score-1", "gate": "gate-1"},
             "audit": {"passed": True}, "gates": {"mem_pct": {"after": 0.5}}}  # fmt: skip
    cand = rel.create_candidate(store, ledger, "digits", kept, removed, extra)
    assert rel.manifest_ids(ledger, cand.tag) == {"kept": kept, "removed": removed}
    with duckdb.connect(str(ledger.path), read_only=True) as con:
        removed_sql = con.execute(
            "SELECT unnest(from_json(manifest->'removed_ids', '[\"VARCHAR\"]')) AS id "
            "FROM releases WHERE tag = ? ORDER BY id", [cand.tag],
        ).fetchall()  # fmt: skip
        summary = con.execute(
            "SELECT manifest->>'$.runs.score', (manifest->>'$.n_kept')::INT, "
            "manifest->>'$.samples_version', (manifest->>'$.gates.mem_pct.after')::DOUBLE "
            "FROM releases WHERE tag = ?", [cand.tag],
        ).fetchone()  # fmt: skip
    assert [r[0] for r in removed_sql] == removed
    assert summary[0] == "score-1" and summary[1] == len(kept) and summary[3] == 0.5
    assert int(summary[2]) == store.table("samples").version


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        (lambda k, r: ([*k, "digits:nope"], r), "not samples of"),
        (lambda k, r: ([*k, "other:000000025"], r), "not samples of"),  # another dataset's
        (lambda k, r: (k[1:], r), "neither kept nor removed"),
        (lambda k, r: (k, r + k[:1]), "both kept and removed"),
        (lambda k, r: (k + k[:1], r), "kept ids repeat"),
        (lambda k, r: ([], r + k), "nothing kept"),
    ],
)
def test_bad_id_lists_are_refused_and_write_nothing(env, lists, match):
    store, ledger = env
    kept, removed = lists(*split(store))
    with pytest.raises(rel.ReleaseError, match=match):
        rel.create_candidate(store, ledger, "digits", kept, removed)
    assert ledger.releases() == []
    assert not store.has_table("release_digits") or lance_tags(store) == {}


def test_reserved_manifest_keys_unknown_tags_and_empty_datasets_are_refused(env):
    store, ledger = env
    with pytest.raises(rel.ReleaseError, match="written by create_candidate"):
        rel.create_candidate(store, ledger, "digits", *split(store), {"kept_ids": []})
    with pytest.raises(rel.ReleaseError, match="has no samples"):
        rel.create_candidate(store, ledger, "empty", ["x"], [])
    with pytest.raises(ValueError, match="invalid dataset name"):
        rel.create_candidate(store, ledger, "../x", ["x"], [])
    for call in (
        lambda: rel.approve(store, ledger, "digits-candidate-9", actor="a"),
        lambda: rel.reject(store, ledger, "digits-candidate-9", actor="a"),
        lambda: rel.show_release(ledger, "digits-candidate-9"),
        lambda: rel.manifest_ids(ledger, "digits-candidate-9"),
    ):
        with pytest.raises(rel.ReleaseNotFound, match="no candidate or release"):
            call()


def test_interrupted_approval_is_finished_not_duplicated(env):
    """A crash between the Lance tag and the ledger record: approving again completes it."""
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store))
    store.db.open_table("release_digits").tags.create("digits-release-1", cand.lance_version)
    with pytest.raises(rel.ReleaseIntegrityError, match="interrupted approval"):
        rel.reject(store, ledger, cand.tag, actor="bob")
    out = rel.approve(store, ledger, cand.tag, actor="ann")
    assert out.lance_version == cand.lance_version
    assert [d["action"] for d in ledger.decisions(cand.tag)] == ["approve"]
    # A next candidate does not reuse an n that only Lance knows about.
    orphan = store.db.open_table("release_digits")
    orphan.tags.create("digits-candidate-2", cand.lance_version)
    assert rel.create_candidate(store, ledger, "digits", *split(store)).n == 3


def test_tag_problems_reports_moved_and_deleted_tags(env):
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    rel.approve(store, ledger, cand.tag, actor="ann")
    newer = rel.create_candidate(store, ledger, "digits", *split(store, 6))
    assert rel.tag_problems(store, ledger) == {}
    table = store.db.open_table("release_digits")
    table.tags.update("digits-release-1", newer.lance_version)
    table.tags.delete(newer.tag)
    problems = rel.tag_problems(store, ledger)
    assert set(problems) == {"digits-release-1", newer.tag}
    assert "moved outside diffcurate" in problems["digits-release-1"]
    assert "no Lance tag" in problems[newer.tag]
    assert rel.tag_problems(store, ledger, "other") == {}
