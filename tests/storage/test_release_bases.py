"""Candidates cut from one base copy per samples version: bytes written grow with the removed
rows, kept rows are never rewritten, old full-copy candidates still read, tampering is caught."""

import os
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from diffcurate.demo.writers import SampleFile
from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SAMPLES
from storage.test_releases import sample_rows, split


def files(n: int, size: int = 4096, seed: int = 0) -> list[SampleFile]:
    """``n`` incompressible images of ``size`` bytes: the corpus bytes are the image bytes."""
    rng = np.random.default_rng(seed)
    return [
        SampleFile(f"{i:09d}", rng.bytes(size), "png", f"caption {i}", {"i": i}) for i in range(n)
    ]


def dir_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names
    )


def tags(store, dataset="digits") -> dict[str, int]:
    table = store.db.open_table(rel.release_table_name(dataset))
    return {t: int(v["version"]) for t, v in table.tags.list().items()}


@pytest.fixture
def env(tmp_path, digit_files):
    store = LanceStore(str(tmp_path / "lancedb"))
    store.insert_new("samples", sample_rows(digit_files[:20], "digits"))
    return store, Ledger(tmp_path / "ledger.duckdb")


def test_candidates_of_one_samples_version_share_one_base_copy(env, digit_files):
    store, ledger = env
    v1 = store.table("samples").version
    c1 = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    c2 = rel.create_candidate(store, ledger, "digits", *split(store, 7))
    base1 = rel.base_tag_name("digits", v1)
    assert set(tags(store)) == {base1, c1.tag, c2.tag}
    m1, m2 = ledger.release(c1.tag)["manifest"], ledger.release(c2.tag)["manifest"]
    assert m1["base_version"] == m2["base_version"] == tags(store)[base1]
    # The base's ids are stored once; neither manifest lists the kept ids.
    assert m1["base_ids"] == sorted(split(store, 0)[0]) and "base_ids_in" not in m1
    assert m2["base_ids_in"] == c1.tag and "base_ids" not in m2
    assert "kept_ids" not in m1 and "kept_ids" not in m2
    assert m2["removed_ids"] == split(store, 7)[1]
    assert rel.manifest_ids(ledger, c2.tag) == dict(zip(("kept", "removed"), split(store, 7),
                                                        strict=True))  # fmt: skip

    # New samples (another ingest): the next candidate gets a new base; old tags still read.
    store.insert_new("samples", sample_rows(digit_files[20:25], "digits"))
    v2 = store.table("samples").version
    c3 = rel.create_candidate(store, ledger, "digits", *split(store, 2))
    assert set(tags(store)) == {base1, rel.base_tag_name("digits", v2), c1.tag, c2.tag, c3.tag}
    assert rel.checkout(store, ledger, c3.tag).num_rows == 23
    for cand, n_removed in ((c1, 3), (c2, 7)):
        kept = rel.checkout(store, ledger, cand.tag, columns=["sample_id"])["sample_id"]
        assert sorted(kept.to_pylist()) == split(store, n_removed)[0][: 20 - n_removed]
        rel.verify(store, ledger, cand.tag)
    rel.verify(store, ledger, c3.tag)

    # Approval: the release row points at the candidate for the base ids (stored once).
    out = rel.approve(store, ledger, c1.tag, actor="ann")
    assert ledger.release(out.tag)["manifest"]["base_ids_in"] == c1.tag
    assert rel.manifest_ids(ledger, out.tag) == rel.manifest_ids(ledger, c1.tag)
    shown = rel.show_release(ledger, out.tag)["manifest"]
    assert shown["kept_ids"] == rel.manifest_ids(ledger, c1.tag)["kept"]
    assert "base_ids" not in shown and "base_ids_in" not in shown
    rel.verify(store, ledger, out.tag)


def test_ingesting_another_dataset_does_not_copy_this_one_again(env, digit_files):
    store, ledger = env
    c1 = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    base = ledger.release(c1.tag)["manifest"]["base_tag"]
    store.insert_new("samples", sample_rows(digit_files[20:30], "other"))
    c2 = rel.create_candidate(store, ledger, "digits", *split(store, 5))
    m2 = ledger.release(c2.tag)["manifest"]
    assert m2["samples_version"] > ledger.release(c1.tag)["manifest"]["samples_version"]
    assert (m2["base_tag"], m2["base_ids_in"]) == (base, c1.tag)
    assert set(tags(store)) == {base, c1.tag, c2.tag}
    assert (
        sorted(rel.checkout(store, ledger, c2.tag)["sample_id"].to_pylist()) == split(store, 5)[0]
    )
    rel.verify(store, ledger, c2.tag)


def candidate_bytes(tmp_path, n_rows: int, n_removed: int) -> tuple[int, int]:
    """(bytes the second candidate of a corpus writes, bytes of the corpus's base copy)."""
    store = LanceStore(str(tmp_path / f"n{n_rows}"))
    store.insert_new("samples", sample_rows(files(n_rows), "digits"))
    ledger = Ledger(tmp_path / f"n{n_rows}.duckdb")
    table_dir = tmp_path / f"n{n_rows}" / "release_digits.lance"
    rel.create_candidate(store, ledger, "digits", *split(store, 1))  # makes the base copy
    base_bytes = dir_bytes(table_dir)
    rel.create_candidate(store, ledger, "digits", *split(store, n_removed))
    return dir_bytes(table_dir) - base_bytes, base_bytes


def test_candidate_bytes_grow_with_removed_rows_not_kept_rows(tmp_path):
    small, small_base = candidate_bytes(tmp_path, 100, 10)
    large, large_base = candidate_bytes(tmp_path, 1000, 10)
    assert large_base > 9 * small_base  # the corpora are 10x apart
    # Same removed count: the same bytes within a small factor, a sliver of the corpus.
    assert large < 1.5 * small
    assert large < 0.01 * large_base
    # More removed rows (same corpus): more bytes.
    more, _ = candidate_bytes(tmp_path / "more", 1000, 500)
    assert more > 2 * large


def old_style_candidate(store, ledger, dataset, kept, removed) -> str:
    """A candidate as releases were written before bases: the kept rows overwrite the table
    and the manifest lists the kept ids."""
    samples = store.table("samples").to_lance()
    n = rel.next_n(store, ledger, dataset)
    tag = rel.candidate_tag(dataset, n)
    table = rel._open_release_table(store, dataset)
    rows = samples.to_table(filter=f"dataset = '{dataset}'")
    rows = rows.filter(pc.is_in(rows["sample_id"], pa.array(kept))).select(SAMPLES.names)
    ds = table.to_lance()
    ds.insert(rows.cast(SAMPLES), mode="overwrite")
    ds.tags.create(tag, ds.version)
    manifest = {"dataset": dataset, "tag": tag, "n": n, "lance_table": table.name,
                "lance_version": ds.version, "samples_version": samples.version,
                "n_kept": len(kept), "n_removed": len(removed), "kept_ids": sorted(kept),
                "removed_ids": sorted(removed), "created_at": datetime.now(UTC).isoformat(),
                "created_by": "old"}  # fmt: skip
    ledger.record_release(tag=tag, dataset=dataset, n=n, kind="candidate",
                          lance_table=table.name, lance_version=ds.version, n_kept=len(kept),
                          n_removed=len(removed), manifest=manifest, created_by="old")  # fmt: skip
    return tag


def test_candidates_written_the_old_way_still_read_verify_and_approve(env):
    store, ledger = env
    kept, removed = split(store, 4)
    old = old_style_candidate(store, ledger, "digits", kept, removed)
    new = rel.create_candidate(store, ledger, "digits", *split(store, 6))
    assert new.n == 2
    assert rel.manifest_ids(ledger, old) == {"kept": kept, "removed": removed}
    assert sorted(rel.checkout(store, ledger, old)["sample_id"].to_pylist()) == kept
    rel.verify(store, ledger, old)
    out = rel.approve(store, ledger, old, actor="ann")
    rel.verify(store, ledger, out.tag)
    assert rel.show_release(ledger, out.tag)["manifest"]["kept_ids"] == kept
    assert (
        sorted(rel.checkout(store, ledger, new.tag)["sample_id"].to_pylist()) == split(store, 6)[0]
    )
    assert rel.tag_problems(store, ledger) == {}


def test_an_altered_ledger_manifest_is_detected(env):
    store, ledger = env
    cand = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    with ledger.connect() as con:
        con.execute(
            "UPDATE releases SET manifest = json_merge_patch(manifest, ?) WHERE tag = ?",
            ['{"removed_ids": ' + str(split(store, 2)[1]).replace("'", '"') + "}", cand.tag],
        )
    with pytest.raises(rel.ReleaseIntegrityError, match="altered outside diffcurate"):
        rel.manifest_ids(ledger, cand.tag)
    with pytest.raises(rel.ReleaseIntegrityError):
        rel.verify(store, ledger, cand.tag)


def test_rows_changed_on_disk_are_detected(env):
    """Another candidate's deletion file copied over this one's: the tag and version still
    match the ledger, the rows do not."""
    store, ledger = env
    c1 = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    c2 = rel.create_candidate(store, ledger, "digits", *split(store, 5))
    ds = store.db.open_table("release_digits").to_lance()
    (f1,) = [f.deletion_file() for f in ds.checkout_version(c1.lance_version).get_fragments()]
    (f2,) = [f.deletion_file() for f in ds.checkout_version(c2.lance_version).get_fragments()]
    root = os.path.join(store.uri, "release_digits.lance")
    with open(os.path.join(root, f2), "rb") as src, open(os.path.join(root, f1), "wb") as dst:
        dst.write(src.read())
    fresh = LanceStore(store.uri)
    assert rel.tag_problems(fresh, ledger) == {}  # the cheap check reads no rows
    rel.verify(fresh, ledger, c1.tag, rows=False)
    with pytest.raises(rel.ReleaseIntegrityError, match="differ from the manifest"):
        rel.verify(fresh, ledger, c1.tag)


def test_a_moved_base_tag_is_refused(env):
    store, ledger = env
    c1 = rel.create_candidate(store, ledger, "digits", *split(store, 3))
    base = rel.base_tag_name("digits", store.table("samples").version)
    store.db.open_table("release_digits").tags.update(base, c1.lance_version)
    with pytest.raises(rel.ReleaseIntegrityError, match="moved outside diffcurate"):
        rel.create_candidate(store, ledger, "digits", *split(store, 5))
    assert rel.list_releases(ledger)[-1].tag == c1.tag
