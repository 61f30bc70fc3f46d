"""Reviewer marks on a candidate release, and applying them as a new candidate.

A reviewer marks a *flagged* sample of a pending candidate (one of its removed ids) ``keep``
(put it back) or ``remove`` (confirm the removal, or undo an earlier ``keep``); a sample the run
kept cannot be marked. Marks are appended to
the ledger's ``review_marks`` table, attributed and timestamped, never updated or deleted; the
latest mark on a sample is the one in force. A mark covers the sample's whole
exact-duplicate group (the hygiene run flags groups, so copies go or stay together): the ids it
covers are stored with it.

Candidates are immutable, so marks are applied by :func:`apply_marks`, which writes a *new*
candidate (through :func:`diffcurate.storage.releases.create_candidate`) whose kept/removed sets
include the marks, with the original candidate's provenance, ``based_on`` and the marks applied
in its manifest. The original candidate is then superseded and is not decided on any more.
The gates measured the original's sets, not the new ones: the new candidate's manifest says
``gates_measured: false`` and keeps the original's results only under ``based_on_gates``, so
approving it needs an explicit override with a reason (or a re-gated candidate).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger

MARKS = ("keep", "remove")
# Manifest keys of a candidate that describe *this* candidate rather than its provenance.
_OWN_KEYS = frozenset({"based_on", "overrides", "gates_measured", "based_on_gates"})
# Manifest keys holding gate results measured on a candidate's own kept/removed sets.
GATE_KEYS = ("gates", "gate_passed")


class ReviewError(ValueError):
    """A mark or its application was refused (the message says why)."""


def record_mark(
    ledger: Ledger,
    tag: str,
    *,
    sample_id: str,
    sample_ids: Sequence[str],
    mark: str,
    actor: str,
    role: str,
    comment: str = "",
) -> str:
    """Append one mark; returns its id.

    Raises:
        ReviewError: an unknown mark, no actor or role, or a covered id that ``tag`` did not
            flag (marks are limited to the candidate's removed ids).
    """
    if mark not in MARKS:
        raise ReviewError(f"unknown mark {mark!r}; use keep or remove")
    if not actor.strip() or not role.strip():
        raise ReviewError("a mark needs an actor and a role")
    if sample_id not in sample_ids:
        raise ReviewError("a mark covers the sample it was made on")
    try:
        flagged = set(rel.manifest_ids(ledger, tag)["removed"])
    except rel.ReleaseNotFound as e:
        raise ReviewError(str(e)) from e
    if unflagged := sorted(set(sample_ids) - flagged):
        raise ReviewError(
            f"{unflagged[0]} is not flagged in {tag}: marks are limited to the flagged "
            "(removed) samples"
        )
    mark_id = f"mark-{uuid.uuid4().hex}"
    with ledger.connect() as con:
        con.execute(
            "INSERT INTO review_marks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [mark_id, tag, sample_id, json.dumps(sorted(sample_ids)), mark, actor, role,
             comment, datetime.now(UTC)],
        )  # fmt: skip
    return mark_id


def marks(ledger: Ledger, tag: str | None = None) -> list[dict[str, Any]]:
    """Marks (on one candidate, or all), oldest first."""
    query, args = "SELECT * FROM review_marks", []
    if tag is not None:
        query, args = query + " WHERE tag = ?", [tag]
    with ledger.connect(read_only=True) as con:
        cur = con.execute(query + " ORDER BY created_at, mark_id", args)
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    for row in rows:
        row["sample_ids"] = json.loads(row["sample_ids"])
    return rows


def effective_marks(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The mark in force on each marked sample id: the latest covering it."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:  # oldest first: later marks overwrite
        for sid in row["sample_ids"]:
            out[sid] = row
    return out


def marked_sets(
    kept: Sequence[str], removed: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Kept and removed ids with the marks applied, and the marks that changed something."""
    keep, drop = set(kept), set(removed)
    changed: dict[str, dict[str, Any]] = {}
    for sid, row in effective_marks(rows).items():
        if row["mark"] == "keep" and sid in drop:
            drop.discard(sid)
            keep.add(sid)
            changed[row["mark_id"]] = row
        elif row["mark"] == "remove" and sid in keep:
            keep.discard(sid)
            drop.add(sid)
            changed[row["mark_id"]] = row
    return sorted(keep), sorted(drop), list(changed.values())


def pending_changes(ledger: Ledger, tag: str) -> list[dict[str, Any]]:
    """The marks on ``tag`` that would change its kept/removed sets if applied now."""
    ids = rel.manifest_ids(ledger, tag)
    return marked_sets(ids["kept"], ids["removed"], marks(ledger, tag))[2]


def superseded_by(ledger: Ledger, tag: str) -> str | None:
    """The candidate created from ``tag`` with reviewer marks applied, if any."""
    with ledger.connect(read_only=True) as con:
        row = con.execute(
            "SELECT tag FROM releases WHERE kind = 'candidate' "
            "AND json_extract_string(manifest, '$.based_on') = ? ORDER BY n LIMIT 1",
            [tag],
        ).fetchone()
    return None if row is None else str(row[0])


def apply_marks(store: LanceStore, ledger: Ledger, tag: str, actor: str) -> rel.ReleaseInfo | None:
    """Write a new candidate with the marks on ``tag`` applied; None when they change nothing.

    Raises:
        ReviewError: ``tag`` is not a pending candidate, or was already superseded.
        ReleaseError: from :func:`create_candidate` (e.g. the dataset changed since).
    """
    info = rel.show(ledger, tag)
    if info.kind != "candidate" or info.status != "pending":
        raise ReviewError(f"{tag!r} is not a pending candidate ({info.kind}, {info.status})")
    if (newer := superseded_by(ledger, tag)) is not None:
        raise ReviewError(f"{tag!r} was already superseded by {newer!r}")
    manifest = ledger.release(tag)["manifest"]
    ids = rel.manifest_ids(ledger, tag)
    kept, removed, changed = marked_sets(ids["kept"], ids["removed"], marks(ledger, tag))
    if not changed:
        return None
    provenance = {
        k: v
        for k, v in manifest.items()
        if k not in rel.RESERVED_KEYS and k not in _OWN_KEYS and k not in GATE_KEYS
    }
    own_gates = {k: manifest[k] for k in GATE_KEYS if k in manifest}
    applied = [
        {"mark_id": m["mark_id"], "sample_id": m["sample_id"], "sample_ids": m["sample_ids"],
         "mark": m["mark"], "actor": m["actor"], "comment": m["comment"]}
        for m in changed
    ]  # fmt: skip
    return rel.create_candidate(
        store, ledger, info.dataset, kept, removed,
        manifest={**provenance, "based_on": tag, "overrides": applied, "gates_measured": False,
                  "based_on_gates": manifest.get("based_on_gates", own_gates)},
        created_by=actor,
    )  # fmt: skip
