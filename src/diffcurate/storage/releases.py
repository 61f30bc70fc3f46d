"""Releases: tagged LanceDB table versions of the samples a hygiene run kept.

Each dataset has its own Lance table ``release_<dataset>`` (``samples`` schema). The dataset's
rows are copied into it once per change of its ``samples`` rows: the *base* version, tagged
``<dataset>-base-<samples version>``. A candidate restores the base version and deletes the
removed ids (Lance deletion files: no kept row is rewritten, so a candidate writes bytes in
proportion to the rows it removes), and tags the resulting version ``<dataset>-candidate-<n>``.
Approval tags the same version ``<dataset>-release-<n>`` (same ``n``: a release names the
candidate it came from). ``samples`` is only read, never written: nothing is deleted from it.
Candidates written before bases existed (a full overwrite with the kept rows) still read and
verify: both are tagged versions holding exactly the kept rows.

Immutability: this module only ever *creates* Lance tags (never updates or deletes one), and Lance
refuses to create a tag whose name exists. Tagged versions are exempt from Lance's version
cleanup. Each tag's version is also recorded in the ledger, so :func:`verify` detects a tag moved
behind diffcurate's back (e.g. with Lance's own ``tags.update``).

The ledger holds, per tag, the manifest (JSON, queryable with DuckDB: removed ids, the
``samples`` version read, and whatever the hygiene flow adds: run ids, audit and gate
summaries) and the append-only decisions (approve / reject / override), attributed to an actor
and role. The base's ids are stored once per base (in the manifest of the first candidate built
on it); a candidate stores its removed ids and a digest of its kept ids, and
:func:`manifest_ids` derives the kept ids (base minus removed) and checks them against that
digest. A candidate is decided once: approved (then released) or rejected.
"""

from __future__ import annotations

import getpass
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from diffcurate.storage.lance_store import LanceStore, validate_dataset_name
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.schemas import SAMPLES

APPROVER = "approver"
_TAG = re.compile(r"^(?P<dataset>.+)-(?P<kind>candidate|release)-(?P<n>[1-9][0-9]*)$")
# Manifest keys written here; the caller's manifest may not set them.
RESERVED_KEYS = frozenset(
    {"dataset", "tag", "n", "lance_table", "lance_version", "kept_ids", "removed_ids",
     "n_kept", "n_removed", "samples_version", "created_at", "created_by", "base_tag",
     "base_version", "base_ids", "base_ids_in", "kept_digest"}
)  # fmt: skip
_READ_BATCH = 1024

Status = Literal["pending", "approved", "rejected", "released"]


class ReleaseError(Exception):
    """A release operation was refused (the message says why); nothing was changed."""


class ReleaseNotFound(ReleaseError):
    """No candidate or release has this tag."""


class ReleaseIntegrityError(ReleaseError):
    """A Lance tag and the ledger disagree (a tag was moved, deleted or its rows differ)."""


@dataclass(frozen=True)
class ReleaseInfo:
    """One candidate or release tag as recorded in the ledger."""

    tag: str
    dataset: str
    n: int
    kind: Literal["candidate", "release"]
    lance_table: str
    lance_version: int
    n_kept: int
    n_removed: int
    created_at: datetime
    created_by: str
    status: Status
    """candidate: pending | approved | rejected; release: released."""

    @classmethod
    def _from_row(cls, row: dict[str, Any], status: Status) -> ReleaseInfo:
        return cls(
            tag=row["tag"], dataset=row["dataset"], n=int(row["n"]), kind=row["kind"],
            lance_table=row["lance_table"], lance_version=int(row["lance_version"]),
            n_kept=int(row["n_kept"]), n_removed=int(row["n_removed"]),
            created_at=row["created_at"], created_by=row["created_by"], status=status,
        )  # fmt: skip


def release_table_name(dataset: str) -> str:
    return f"release_{validate_dataset_name(dataset)}"


def candidate_tag(dataset: str, n: int) -> str:
    return f"{dataset}-candidate-{n}"


def release_tag(dataset: str, n: int) -> str:
    return f"{dataset}-release-{n}"


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _status(kind: str, decisions: Sequence[dict[str, Any]]) -> Status:
    if kind == "release":
        return "released"
    actions = {d["action"] for d in decisions}
    if "approve" in actions:
        return "approved"
    if "reject" in actions:
        return "rejected"
    return "pending"


def _open_release_table(store: LanceStore, dataset: str):
    name = release_table_name(dataset)
    if name in store.db.list_tables().tables:
        return store.db.open_table(name)
    return store.db.create_table(name, schema=SAMPLES, exist_ok=True)


def _lance_tags(table) -> dict[str, int]:
    return {tag: int(info["version"]) for tag, info in table.tags.list().items()}


def next_n(store: LanceStore, ledger: Ledger, dataset: str) -> int:
    """One more than any n used for this dataset, in the ledger or (after a crash between the
    Lance tag and the ledger record) in Lance: an n is never reused."""
    used = [int(r["n"]) for r in ledger.releases(dataset)]
    name = release_table_name(dataset)
    if name in store.db.list_tables().tables:
        for tag in _lance_tags(store.db.open_table(name)):
            m = _TAG.match(tag)
            if m and m["dataset"] == dataset:
                used.append(int(m["n"]))
    return max(used, default=0) + 1


def _unique(ids: Iterable[str], what: str) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ReleaseError(f"{what} ids repeat: {dup}")
    return ids


def create_candidate(
    store: LanceStore,
    ledger: Ledger,
    dataset: str,
    kept_ids: Iterable[str],
    removed_ids: Iterable[str],
    manifest: dict[str, Any] | None = None,
    *,
    created_by: str | None = None,
) -> ReleaseInfo:
    """Write the kept samples as a new version of ``release_<dataset>`` and tag it a candidate.

    ``kept_ids`` and ``removed_ids`` must partition the dataset's samples (every sample is
    accounted for, none twice), so the manifest says what happened to each. ``manifest`` adds
    the provenance (run ids, audit and gate summaries); a ``gate_passed: false`` entry makes
    :func:`approve` require an explicit override.

    Raises:
        ReleaseError: ids that are unknown, repeated, overlapping or incomplete; nothing kept;
            a manifest key that this function writes itself.
    """
    validate_dataset_name(dataset)
    extra = dict(manifest or {})
    if clash := sorted(RESERVED_KEYS & set(extra)):
        raise ReleaseError(f"manifest keys {clash} are written by create_candidate itself")
    kept = _unique(kept_ids, "kept")
    removed = _unique(removed_ids, "removed")
    if both := sorted(set(kept) & set(removed))[:5]:
        raise ReleaseError(f"ids both kept and removed: {both}")
    if not kept:
        raise ReleaseError(f"nothing kept: refusing an empty candidate release of {dataset!r}")

    # Pin the samples version: validation and copy read the same snapshot.
    samples = store.table("samples").to_lance()
    samples_version = int(samples.version)
    where = f"dataset = '{dataset}'"  # validated name: no quotes
    all_ids = set(samples.to_table(columns=["sample_id"], filter=where)["sample_id"].to_pylist())
    if not all_ids:
        raise ReleaseError(f"dataset {dataset!r} has no samples")
    if unknown := sorted((set(kept) | set(removed)) - all_ids):
        raise ReleaseError(f"{len(unknown)} ids are not samples of {dataset!r}, e.g. {unknown[:5]}")
    if missing := sorted(all_ids - set(kept) - set(removed)):
        raise ReleaseError(
            f"{len(missing)} samples of {dataset!r} are neither kept nor removed, e.g. "
            f"{missing[:5]}: pass every sample id in one of the two lists"
        )

    n = next_n(store, ledger, dataset)
    tag = candidate_tag(dataset, n)
    actor = created_by or _default_actor()
    table = _open_release_table(store, dataset)
    if tag in _lance_tags(table):  # next_n saw every tag; only a concurrent writer gets here
        raise ReleaseError(f"tag {tag!r} already exists on {table.name}")
    base_ids = sorted(all_ids)
    base_tag, base_version = _base(table, ledger, samples, dataset, all_ids)
    version = _delete_removed(table, base_version, kept, removed)
    table.to_lance().tags.create(tag, version)

    holder = _base_ids_holder(ledger, dataset, table.name, base_version)
    created_at = datetime.now(UTC)
    full = {
        **extra,
        "dataset": dataset, "tag": tag, "n": n, "lance_table": table.name,
        "lance_version": version, "samples_version": samples_version,
        "base_tag": base_tag, "base_version": base_version,
        **({"base_ids": base_ids} if holder is None else {"base_ids_in": holder}),
        "n_kept": len(kept), "n_removed": len(removed),
        "kept_digest": kept_digest(kept), "removed_ids": sorted(removed),
        "created_at": created_at.isoformat(), "created_by": actor,
    }  # fmt: skip
    ledger.record_release(
        tag=tag, dataset=dataset, n=n, kind="candidate", lance_table=table.name,
        lance_version=version, n_kept=len(kept), n_removed=len(removed), manifest=full,
        created_by=actor,
    )  # fmt: skip
    return show(ledger, tag)


def kept_digest(kept: Iterable[str]) -> str:
    """SHA-256 of the sorted kept ids, one per line: the ledger's O(1) record of a kept set."""
    h = hashlib.sha256()
    for sample_id in sorted(kept):
        h.update(sample_id.encode())
        h.update(b"\n")
    return h.hexdigest()


def base_tag_name(dataset: str, samples_version: int) -> str:
    return f"{dataset}-base-{samples_version}"


def _base(table, ledger: Ledger, samples, dataset: str, ids: set[str]) -> tuple[str, int]:
    """The tag and version of the release table holding every row of ``dataset`` as of the
    pinned ``samples`` version, copying the rows only when no tagged base holds them yet.

    ``samples`` rows are only ever inserted (keyed, never updated or deleted), so a base whose
    ids are the dataset's current ids holds its current rows: ingesting another dataset does
    not cost this one a copy. The newest base is the only one considered. A base tag moved
    outside diffcurate is refused: candidates would be cut from rows that are not the dataset's.
    """
    samples_version = int(samples.version)
    tag = base_tag_name(dataset, samples_version)
    ds = table.to_lance()
    bases = {
        int(m[1]): (t, v)
        for t, v in _lance_tags(table).items()
        if (m := re.fullmatch(re.escape(dataset) + r"-base-([0-9]+)", t))
        and int(m[1]) <= samples_version
    }
    if bases:
        newest, version = bases[max(bases)]
        recorded = _recorded_base_version(ledger, dataset, table.name, newest)
        if recorded is not None and recorded != version:
            raise ReleaseIntegrityError(
                f"base tag {newest!r} points at version {version} of {table.name}; the ledger "
                f"recorded {recorded}: the tag was moved outside diffcurate"
            )
        held = ds.checkout_version(version).to_table(columns=["sample_id"])["sample_id"]
        if len(held) == len(ids) and set(held.to_pylist()) == ids:
            return newest, version
        if newest == tag:
            raise ReleaseIntegrityError(f"base {tag!r} does not hold the rows of {dataset!r}")
    where = f"dataset = '{dataset}'"  # validated name: no quotes

    def rows() -> Iterator[pa.RecordBatch]:  # memory bounded by the batch size
        for batch in samples.to_batches(filter=where, batch_size=_READ_BATCH):
            yield batch.select(SAMPLES.names).cast(SAMPLES)

    # One Lance overwrite commit. Written through Lance, not lancedb's `add`, which re-infers
    # the schema on overwrite (it would turn the variable-length embedding lists into
    # fixed-size vectors).
    ds.insert(pa.RecordBatchReader.from_batches(SAMPLES, rows()), mode="overwrite")
    version = int(ds.version)
    if (written := ds.count_rows()) != len(ids):
        raise ReleaseIntegrityError(f"copied {written} rows of {dataset!r}, expected {len(ids)}")
    ds.tags.create(tag, version)
    return tag, version


def _delete_removed(table, base_version: int, kept: list[str], removed: list[str]) -> int:
    """Commit the base version minus the removed ids as the latest version; return it.

    Restore-then-delete is two commits; a concurrent candidate could interleave its own
    commits (Lance retries a delete on the newest version). The new version's ids are
    therefore read back and must be exactly the kept ids before anything is tagged.
    """
    ds = table.to_lance().checkout_version(base_version)
    ds.restore()
    if removed:
        ds.delete(pc.field("sample_id").isin(pa.array(removed, pa.string())))
    version = int(ds.version)
    got = ds.checkout_version(version).to_table(columns=["sample_id"])["sample_id"]
    if sorted(got.to_pylist()) != sorted(kept):
        raise ReleaseError(
            f"version {version} of {table.name} does not hold exactly the kept ids (a concurrent "
            "candidate of the same dataset?): nothing was tagged; create the candidate again"
        )
    return version


def _base_ids_holder(ledger: Ledger, dataset: str, table: str, base_version: int) -> str | None:
    """The tag whose manifest stores the ids of this base, if any (they are stored once)."""
    with ledger.connect(read_only=True) as con:
        found = con.execute(
            "SELECT tag FROM releases WHERE dataset = ? AND lance_table = ? "
            "AND TRY_CAST(manifest->>'base_version' AS BIGINT) = ? "
            "AND json_exists(manifest, '$.base_ids') ORDER BY created_at LIMIT 1",
            [dataset, table, base_version],
        ).fetchone()
    return None if found is None else str(found[0])


def _recorded_base_version(ledger: Ledger, dataset: str, table: str, base_tag: str) -> int | None:
    with ledger.connect(read_only=True) as con:
        found = con.execute(
            "SELECT DISTINCT TRY_CAST(manifest->>'base_version' AS BIGINT) FROM releases "
            "WHERE dataset = ? AND lance_table = ? AND manifest->>'base_tag' = ?",
            [dataset, table, base_tag],
        ).fetchall()
    versions = {int(v) for (v,) in found if v is not None}
    if len(versions) > 1:
        raise ReleaseIntegrityError(f"the ledger records {base_tag!r} at versions {versions}")
    return versions.pop() if versions else None


def _row(ledger: Ledger, tag: str) -> dict[str, Any]:
    try:
        return ledger.release(tag)
    except KeyError:
        raise ReleaseNotFound(f"no candidate or release tagged {tag!r}") from None


def _candidate(ledger: Ledger, tag: str) -> dict[str, Any]:
    row = _row(ledger, tag)
    if row["kind"] != "candidate":
        raise ReleaseError(
            f"{tag!r} is a release, not a candidate: decisions are taken on candidates "
            f"({candidate_tag(row['dataset'], row['n'])})"
        )
    return row


def _check_role(role: str) -> None:
    if role != APPROVER:
        raise ReleaseError(f"only the {APPROVER!r} role may approve or reject (got {role!r})")


def approve(
    store: LanceStore,
    ledger: Ledger,
    tag: str,
    actor: str,
    comment: str = "",
    *,
    role: str = APPROVER,
    override: bool = False,
) -> ReleaseInfo:
    """Approve a pending candidate: tag its version ``<dataset>-release-<n>``, immutably.

    A candidate whose manifest says ``gate_passed: false`` needs ``override=True`` and a
    comment; the override is recorded as its own decision before the approval.

    Raises:
        ReleaseNotFound: unknown tag.
        ReleaseError: not a candidate, already approved or rejected, failed gate without
            override, the release tag already exists, or a role other than approver.
        ReleaseIntegrityError: the candidate's Lance tag no longer points at its version.
    """
    _check_role(role)
    row = _candidate(ledger, tag)
    decisions = ledger.decisions(tag)
    status = _status("candidate", decisions)
    if status != "pending":
        raise ReleaseError(f"{tag!r} is already {status}; a candidate is decided once")
    dataset, n, version = row["dataset"], int(row["n"]), int(row["lance_version"])
    final = release_tag(dataset, n)
    if row["manifest"].get("gate_passed") is False and not override:
        raise ReleaseError(
            f"{tag!r} failed its gates; approving it needs an explicit override with a comment"
        )
    if override and not comment.strip():
        raise ReleaseError("an override needs a comment saying why")
    table = store.db.open_table(row["lance_table"])
    tags = _lance_tags(table)
    if tags.get(tag) != version:
        raise ReleaseIntegrityError(
            f"candidate tag {tag!r} points at version {tags.get(tag)} of {row['lance_table']}, "
            f"the ledger recorded {version}: refusing to release it"
        )
    if final not in tags:
        try:
            table.tags.create(final, version)  # Lance refuses an existing name: never a move
        except RuntimeError as e:
            raise ReleaseError(f"cannot create release tag {final!r}: {e}") from e
    elif tags[final] != version:
        raise ReleaseIntegrityError(
            f"release tag {final!r} already exists at version {tags[final]}, not the "
            f"candidate's {version}; tags are never moved"
        )
    # else: an approval interrupted after tagging this very version; finish recording it.
    manifest = {
        **row["manifest"], "tag": final, "candidate": tag, "approved_by": actor,
        "approval_comment": comment, "override": override,
    }  # fmt: skip
    if manifest.pop("base_ids", None) is not None:  # stored once per base: point at them
        manifest["base_ids_in"] = tag
    # The decisions and the release row go in one transaction: all or nothing.
    ledger.record_approval(
        tag, actor=actor, role=role, comment=comment, override=override,
        release={"tag": final, "dataset": dataset, "n": n, "lance_table": row["lance_table"],
                 "lance_version": version, "n_kept": row["n_kept"],
                 "n_removed": row["n_removed"], "manifest": manifest, "created_by": actor},
    )  # fmt: skip
    return show(ledger, final)


def interrupted_approval(store: LanceStore, ledger: Ledger, tag: str) -> str | None:
    """The release tag Lance holds for a still-pending candidate, if any.

    Approval creates the Lance release tag first and then records the decision and release row
    in one ledger transaction; a crash between the two leaves exactly this state. Approving the
    candidate again completes it (:func:`approve` accepts a release tag already at the
    candidate's version); nothing else may happen to the candidate meanwhile.
    """
    row = _row(ledger, tag)
    if row["kind"] != "candidate" or _status("candidate", ledger.decisions(tag)) != "pending":
        return None
    if row["lance_table"] not in store.db.list_tables().tables:
        return None
    final = release_tag(row["dataset"], int(row["n"]))
    return final if final in _lance_tags(store.db.open_table(row["lance_table"])) else None


def reject(
    store: LanceStore,
    ledger: Ledger,
    tag: str,
    actor: str,
    comment: str = "",
    *,
    role: str = APPROVER,
) -> ReleaseInfo:
    """Reject a pending candidate: records the decision; no release tag is ever created."""
    _check_role(role)
    row = _candidate(ledger, tag)
    status = _status("candidate", ledger.decisions(tag))
    if status != "pending":
        raise ReleaseError(f"{tag!r} is already {status}; a candidate is decided once")
    final = release_tag(row["dataset"], int(row["n"]))
    if final in _lance_tags(store.db.open_table(row["lance_table"])):
        raise ReleaseIntegrityError(
            f"{final!r} exists in Lance (an interrupted approval?): approve {tag!r} to finish "
            "it; a release tag is never deleted"
        )
    ledger.record_decision(tag, action="reject", actor=actor, role=role, comment=comment)
    return show(ledger, tag)


def show(ledger: Ledger, tag: str) -> ReleaseInfo:
    row = _row(ledger, tag)
    decisions = ledger.decisions(row["manifest"].get("candidate", tag))
    return ReleaseInfo._from_row(row, _status(row["kind"], decisions))


def list_releases(ledger: Ledger, dataset: str | None = None) -> list[ReleaseInfo]:
    """Candidates and releases, oldest first, with their status."""
    decided: dict[str, list[dict[str, Any]]] = {}
    for d in ledger.decisions():
        decided.setdefault(d["tag"], []).append(d)
    return [
        ReleaseInfo._from_row(r, _status(r["kind"], decided.get(r["tag"], [])))
        for r in ledger.releases(dataset)
    ]


def show_release(ledger: Ledger, tag: str) -> dict[str, Any]:
    """A tag's ledger record: ``info``, ``manifest`` and the candidate's ``decisions``.

    The manifest is shown as a document about this tag: ``kept_ids`` and ``removed_ids`` (the
    kept ids derived by :func:`manifest_ids`), never the base's ids stored for other tags.
    """
    row = _row(ledger, tag)
    candidate = row["manifest"].get("candidate", tag)
    decisions = ledger.decisions(candidate)
    manifest = {k: v for k, v in row["manifest"].items() if k not in ("base_ids", "base_ids_in")}
    if "kept_ids" not in manifest:
        manifest["kept_ids"] = manifest_ids(ledger, tag)["kept"]
    return {
        "info": ReleaseInfo._from_row(row, _status(row["kind"], decisions)),
        "manifest": manifest,
        "decisions": decisions,
    }


def manifest_ids(ledger: Ledger, tag: str) -> dict[str, list[str]]:
    """``{"kept": [...], "removed": [...]}``, sorted, from the ledger alone.

    Manifests written before bases existed list the kept ids; newer ones hold the removed ids
    and a digest of the kept ids, which are the base's ids (stored once per base) minus the
    removed ones.

    Raises:
        ReleaseNotFound: unknown tag.
        ReleaseIntegrityError: the derived kept ids do not match the recorded digest (the
            ledger's manifests were altered).
    """
    manifest = _row(ledger, tag)["manifest"]
    removed = sorted(manifest.get("removed_ids") or [])
    if "kept_digest" not in manifest:
        return {"kept": sorted(manifest.get("kept_ids") or []), "removed": removed}
    if "base_ids" in manifest:
        base = manifest["base_ids"]
    else:
        holder = _row(ledger, manifest["base_ids_in"])["manifest"]
        if holder.get("base_version") != manifest.get("base_version"):
            raise ReleaseIntegrityError(
                f"{tag!r}: {manifest['base_ids_in']!r} stores the ids of another base"
            )
        base = holder.get("base_ids") or []
    gone = set(removed)
    kept = sorted(i for i in base if i not in gone)
    if len(kept) + len(removed) != len(base) or kept_digest(kept) != manifest["kept_digest"]:
        raise ReleaseIntegrityError(
            f"{tag!r}: the ledger's base and removed ids do not give the recorded kept set "
            "(the manifest was altered outside diffcurate)"
        )
    return {"kept": kept, "removed": removed}


def checkout(
    store: LanceStore, ledger: Ledger, tag: str, columns: list[str] | None = None
) -> pa.Table:
    """The rows of a tagged version (read through the Lance tag, checked against the ledger)."""
    row = _row(ledger, tag)
    ds = _checked_out(store, row)
    return ds.to_table(columns=columns)


def _checked_out(store: LanceStore, row: dict[str, Any]):
    tag, name = row["tag"], row["lance_table"]
    if name not in store.db.list_tables().tables:
        raise ReleaseIntegrityError(f"{tag!r}: Lance table {name} is missing")
    table = store.db.open_table(name)
    tags = _lance_tags(table)
    if tag not in tags:
        raise ReleaseIntegrityError(f"{tag!r} is recorded in the ledger but has no Lance tag")
    if tags[tag] != int(row["lance_version"]):
        raise ReleaseIntegrityError(
            f"{tag!r} points at version {tags[tag]} of {name}; the ledger recorded "
            f"{row['lance_version']}: the tag was moved outside diffcurate"
        )
    return table.to_lance().checkout_version(tag)


def tag_problems(store: LanceStore, ledger: Ledger, dataset: str | None = None) -> dict[str, str]:
    """The tags whose Lance tag no longer matches the ledger, with what is wrong.

    The cheap part of :func:`verify`, for every tag at once (each release table is opened
    once; the rows are not read): the Lance tag is missing or points at another version than
    the ledger recorded, or an approval was left half-done.
    """
    rows = ledger.releases(dataset)
    tables = set(store.db.list_tables().tables)
    lance: dict[str, dict[str, int]] = {}
    problems: dict[str, str] = {}
    decided: dict[str, list[dict[str, Any]]] = {}
    for d in ledger.decisions():
        decided.setdefault(d["tag"], []).append(d)
    for row in rows:
        tag, name, version = row["tag"], row["lance_table"], int(row["lance_version"])
        if name not in tables:
            problems[tag] = f"Lance table {name} is missing"
            continue
        if name not in lance:
            lance[name] = _lance_tags(store.db.open_table(name))
        tags = lance[name]
        if tag not in tags:
            problems[tag] = "recorded in the ledger but has no Lance tag (deleted)"
        elif tags[tag] != version:
            problems[tag] = (
                f"points at version {tags[tag]} of {name}; the ledger recorded {version} "
                "(moved outside diffcurate)"
            )
        elif (
            row["kind"] == "candidate"
            and _status("candidate", decided.get(tag, [])) == "pending"
            and release_tag(row["dataset"], int(row["n"])) in tags
        ):
            problems[tag] = "interrupted approval: the release tag exists, the approval does not"
    return problems


def verify(store: LanceStore, ledger: Ledger, tag: str, *, rows: bool = True) -> None:
    """Check a tag against the ledger: the Lance tag exists, points at the recorded version,
    that version holds exactly the manifest's kept ids (read only with ``rows``), and (for a
    candidate) no approval was left half-done (see :func:`interrupted_approval`). Raises
    ReleaseIntegrityError."""
    row = _row(ledger, tag)
    ds = _checked_out(store, row)
    if (final := interrupted_approval(store, ledger, tag)) is not None:
        raise ReleaseIntegrityError(
            f"interrupted approval: Lance holds {final!r} but the ledger records no approval "
            f"of {tag!r}; approve {tag!r} again to complete it"
        )
    if not rows:
        return
    ids = ds.to_table(columns=["sample_id"])["sample_id"].to_pylist()
    if sorted(ids) != manifest_ids(ledger, tag)["kept"]:
        raise ReleaseIntegrityError(f"{tag!r}: the tagged rows differ from the manifest")
