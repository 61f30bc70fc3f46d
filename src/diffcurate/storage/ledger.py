"""The DuckDB ledger: what ran, when, on what, with what outcome.

The orchestrating process is the only writer (DuckDB allows one writing process per file), and
it holds the file open only for the duration of each write so readers such as the dashboard are
never locked out for a whole run. Bulk rows never go here; they go to LanceDB.

Besides ``runs``, the ledger holds the decision tables: ``audits``, ``gate_checks``,
``releases``, ``decisions`` and ``review_marks``, and the dashboard's ``users``. All their DDL
is here, under one schema version. They are append-only: this class offers no method that updates
or deletes their rows, and each row is timestamped (and, for decisions, attributed).

Decisions are hash-chained: each row stores its sequence number, the previous row's hash and
``sha256(previous hash, its own content)``, and ``ledger_meta`` holds the chain's head (last
sequence number and hash), written in the same transaction. :meth:`Ledger.decision_chain_problems`
recomputes the chain, so a decision row deleted, edited or inserted by hand (e.g. with the
``duckdb`` shell) is detected. The chain is unkeyed: it is evidence against hand edits, not
against someone who rewrites every later hash and the head as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
from pydantic import BaseModel, ConfigDict

from diffcurate.storage.ledger_errors import LedgerError, LedgerLocked, classify

LOCK_WAIT_S = 10.0
"""How long opening the ledger retries, with backoff, while another process holds its lock:
writes hold it only for one statement or transaction, so a conflict clears in milliseconds."""

SCHEMA_VERSION = 4
"""1: runs. 2: + audits, gate_checks, releases, decisions. 3: ``users`` and ``review_marks``
come under this versioning (earlier they were created by their own modules, with the same
DDL). 4: ``decisions`` gains ``seq``, ``prev_hash`` and ``row_hash`` (the hash chain); the
upgrade chains the existing rows in (created_at, decision_id) order. Every step is additive:
opening an older ledger creates the missing tables and columns and bumps the stored version."""

RunStatus = Literal["running", "completed", "failed", "interrupted"]
"""What the ledger writes in ``runs.status``: :meth:`Ledger.start_run` and :meth:`Ledger.reopen_run`
``running``, :meth:`Ledger.finish_run` (and :meth:`Ledger.recording`) ``completed`` or ``failed``,
:meth:`Ledger.mark_interrupted` ``interrupted``."""

RELEASE_KINDS = ("candidate", "release")
DECISION_ACTIONS = ("approve", "reject", "override")

_DDL = [
    """CREATE TABLE IF NOT EXISTS ledger_meta (name VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id      VARCHAR PRIMARY KEY,
        kind        VARCHAR NOT NULL,      -- ingest | score | audit | gate | ...
        dataset     VARCHAR,
        source      VARCHAR,
        status      VARCHAR NOT NULL,      -- running | completed | failed | interrupted
        started_at  TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        seconds     DOUBLE,
        params      JSON,
        stats       JSON,
        error       VARCHAR,
        host        VARCHAR NOT NULL,
        pid         INTEGER NOT NULL
    )""",
    # Version 2: decision tables, append-only.
    """CREATE TABLE IF NOT EXISTS audits (
        audit_id    VARCHAR PRIMARY KEY,
        run_id      VARCHAR NOT NULL,
        dataset     VARCHAR NOT NULL,
        attribute   VARCHAR NOT NULL,      -- the group attribute audited (metadata column, ...)
        groups      JSON NOT NULL,         -- per-group statistics
        summary     JSON NOT NULL,         -- overall statistics (ratios, p-values, effect size)
        passed      BOOLEAN NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS gate_checks (
        check_id       VARCHAR PRIMARY KEY,
        run_id         VARCHAR NOT NULL,
        name           VARCHAR NOT NULL,   -- mem_pct | fd | kid | audit | ...
        value_before   DOUBLE,
        value_after    DOUBLE,
        threshold      DOUBLE,
        passed         BOOLEAN NOT NULL,
        policy_version VARCHAR NOT NULL,
        inputs         JSON NOT NULL,
        created_at     TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS releases (
        tag           VARCHAR PRIMARY KEY,  -- <dataset>-candidate-<n> | <dataset>-release-<n>
        dataset       VARCHAR NOT NULL,
        n             INTEGER NOT NULL,
        kind          VARCHAR NOT NULL,     -- candidate | release
        lance_table   VARCHAR NOT NULL,
        lance_version BIGINT NOT NULL,
        n_kept        BIGINT NOT NULL,
        n_removed     BIGINT NOT NULL,
        manifest      JSON NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL,
        created_by    VARCHAR NOT NULL,
        UNIQUE (dataset, kind, n)
    )""",
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id VARCHAR PRIMARY KEY,
        tag         VARCHAR NOT NULL,      -- the candidate tag decided on
        action      VARCHAR NOT NULL,      -- approve | reject | override
        actor       VARCHAR NOT NULL,
        role        VARCHAR NOT NULL,
        comment     VARCHAR NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL,
        seq         BIGINT,                -- position in the hash chain, 1, 2, ... (version 4)
        prev_hash   VARCHAR,               -- row_hash of seq - 1 ('' for the first)
        row_hash    VARCHAR                -- sha256 of prev_hash and this row's content
    )""",
    # Version 3: dashboard users (storage.users) and reviewer marks (storage.reviews).
    """CREATE TABLE IF NOT EXISTS users (
        name       VARCHAR PRIMARY KEY,
        role       VARCHAR NOT NULL,
        token_hash VARCHAR NOT NULL UNIQUE,   -- sha256 hex of the token; never the token
        created_at TIMESTAMPTZ NOT NULL,
        created_by VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS review_marks (
        mark_id    VARCHAR PRIMARY KEY,
        tag        VARCHAR NOT NULL,     -- the candidate marked on
        sample_id  VARCHAR NOT NULL,     -- the sample the reviewer looked at
        sample_ids JSON NOT NULL,        -- every id the mark covers (its exact-duplicate group)
        mark       VARCHAR NOT NULL,     -- keep | remove
        actor      VARCHAR NOT NULL,
        role       VARCHAR NOT NULL,
        comment    VARCHAR NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    )""",
]


_DECISION_COLS = "decision_id, tag, action, actor, role, comment, created_at"
_CHAIN_HEAD = "decisions_head"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LedgerVersionError(LedgerError):
    """The ledger file was written by a newer diffcurate with a schema this one does not know."""


class LedgerTamperError(RuntimeError):
    """The decisions' hash chain does not verify: a row was deleted, edited or inserted."""


def _now() -> datetime:
    return datetime.now(UTC)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunScope:
    """The run a :meth:`Ledger.recording` block is recording.

    Attributes:
        run_id: The run's id (new, or the resumed run's).
        resumed: True when an interrupted or failed run with the same fingerprint was reopened.
        stats: Called when the run closes, completed or failed, for the ``stats`` it stores;
            set it as soon as the summary exists so a failure still records what was done.
    """

    run_id: str
    resumed: bool = False
    stats: Callable[[], dict[str, Any]] | None = None


class RunRecord(BaseModel):
    """One row of the ``runs`` table, as :meth:`Ledger.runs` and :meth:`Ledger.run` give it:
    the columns as typed fields (in the table's order), ``params`` and ``stats`` decoded from
    their JSON (``{}`` when none was stored). Frozen: a record is what was read, not a handle
    to update the row with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    kind: str
    dataset: str | None
    source: str | None
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    seconds: float | None
    params: dict[str, Any]
    stats: dict[str, Any]
    error: str | None
    host: str
    pid: int


_RUN_COLS = ", ".join(RunRecord.model_fields)


class Ledger:
    """Append-mostly record of runs in ``ledger.duckdb``."""

    def __init__(self, path: Path, lock_wait: float | None = None) -> None:
        """Open (and create or upgrade) the ledger at ``path``.

        An up-to-date ledger is only read here, so read commands work on a file this user may
        not write and do not take the writer's lock.

        Args:
            lock_wait: Seconds each :meth:`connect` retries while another process holds the
                file lock, before raising :class:`LedgerLocked` [default: ``LOCK_WAIT_S``].
        """
        self.path = Path(path)
        self.lock_wait = LOCK_WAIT_S if lock_wait is None else lock_wait
        if self.path.exists() and self._up_to_date():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute(_DDL[0])
            row = con.execute(
                "SELECT value FROM ledger_meta WHERE name = 'schema_version'"
            ).fetchone()
            stored = None if row is None else int(row[0])
            if stored is not None and stored > SCHEMA_VERSION:
                raise LedgerVersionError(
                    f"{self.path} has ledger schema version {stored}; this diffcurate knows "
                    f"versions up to {SCHEMA_VERSION}: upgrade diffcurate to use it"
                )
            # Every migration is additive (CREATE TABLE IF NOT EXISTS), so replaying the DDL
            # upgrades an older ledger in place.
            for stmt in _DDL[1:]:
                con.execute(stmt)
            if stored is not None and stored < 4:
                _chain_existing_decisions(con)
            if stored != SCHEMA_VERSION:
                con.execute(
                    "INSERT OR REPLACE INTO ledger_meta VALUES ('schema_version', ?)",
                    [str(SCHEMA_VERSION)],
                )

    def _up_to_date(self) -> bool:
        """True when the file holds this schema version (nothing to create or migrate)."""
        with self.connect(read_only=True) as con:
            try:
                row = con.execute(
                    "SELECT value FROM ledger_meta WHERE name = 'schema_version'"
                ).fetchone()
            except duckdb.CatalogException:
                return False
        stored = None if row is None else int(row[0])
        if stored is not None and stored > SCHEMA_VERSION:
            raise LedgerVersionError(
                f"{self.path} has ledger schema version {stored}; this diffcurate knows "
                f"versions up to {SCHEMA_VERSION}: upgrade diffcurate to use it"
            )
        return stored == SCHEMA_VERSION

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the enclosed block (readers are never locked out long).

        For the modules that own a ledger table's rows (users, reviews, releases); the tables
        themselves are created here. Opening retries with jittered exponential backoff for up
        to ``lock_wait`` seconds while another process holds DuckDB's file lock.

        Raises:
            LedgerLocked: the lock stayed held for ``lock_wait`` seconds.
            LedgerReadOnly: a read-write open of a file this user may not write.
            LedgerCorrupt: the file is truncated or not a DuckDB database (also when that
                shows only while the block reads it).
        """
        con = self._open(read_only)
        try:
            yield con
        except duckdb.IOException as e:
            raise classify(self.path, e) from e
        finally:
            con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        start = time.monotonic()
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as e:
                waited = time.monotonic() - start
                error = classify(self.path, e, waited)
                if not isinstance(error, LedgerLocked) or waited >= self.lock_wait:
                    raise error from e
            # Jitter keeps two waiting processes from retrying in lockstep.
            time.sleep(min(delay * random.uniform(0.5, 1.5), self.lock_wait - waited))
            delay = min(delay * 2, 0.5)

    def start_run(
        self,
        kind: str,
        *,
        dataset: str | None = None,
        source: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> str:
        """Record a run as started; returns its id."""
        run_id = f"{kind}-{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        with self.connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, kind, dataset, source, status, started_at, params, "
                "host, pid) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                [
                    run_id,
                    kind,
                    dataset,
                    source,
                    _now(),
                    json.dumps(params or {}, default=str),
                    socket.gethostname(),
                    os.getpid(),
                ],
            )
        return run_id

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        stats: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Close a run with its outcome and statistics."""
        if status not in {"completed", "failed"}:
            raise ValueError(f"unknown final status {status!r}")
        finished = _now()
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, "
                "seconds = epoch_ms(?::TIMESTAMPTZ - started_at) / 1000.0, "
                "stats = ?, error = ? WHERE run_id = ?",
                [status, finished, finished, json.dumps(stats or {}, default=str), error, run_id],
            )

    @contextmanager
    def recording(
        self,
        kind: str,
        *,
        dataset: str | None = None,
        source: str | None = None,
        params: dict[str, Any] | None = None,
        resume: str | None = None,
    ) -> Iterator[RunScope]:
        """Record the enclosed block as one run: started on entry, completed on exit, failed
        (with the error, then re-raised) on any exception, ``KeyboardInterrupt`` included.

        Args:
            resume: A run fingerprint: reopen the newest interrupted or failed run of ``kind``
                with it (:meth:`resumable_run`) instead of starting a new one, when there is one.
        """
        resumed = None if resume is None else self.resumable_run(kind, resume)
        if resumed is not None:
            self.reopen_run(resumed)
            run_id = resumed
        else:
            run_id = self.start_run(kind, dataset=dataset, source=source, params=params)
        scope = RunScope(run_id=run_id, resumed=resumed is not None)
        try:
            yield scope
        except BaseException as err:
            stats = None if scope.stats is None else scope.stats()
            self.finish_run(run_id, status="failed", stats=stats, error=repr(err))
            raise
        stats = None if scope.stats is None else scope.stats()
        self.finish_run(run_id, status="completed", stats=stats)

    def mark_interrupted(self) -> list[str]:
        """Mark runs of this host whose process died without finishing (SIGKILL, power loss)."""
        host = socket.gethostname()
        with self.connect() as con:
            rows = con.execute(
                "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", [host]
            ).fetchall()
            dead = [run_id for run_id, pid in rows if not _pid_alive(pid)]
            for run_id in dead:
                con.execute(
                    "UPDATE runs SET status = 'interrupted', error = 'process died before "
                    "finishing' WHERE run_id = ?",
                    [run_id],
                )
        return dead

    def resumable_run(self, kind: str, fingerprint: str) -> str | None:
        """The newest interrupted/failed run of ``kind`` whose params carry ``fingerprint``.

        A run's fingerprint hashes everything that determines its output, so resuming it
        cannot mix rows computed under different settings.
        """
        self.mark_interrupted()
        with self.connect(read_only=True) as con:
            row = con.execute(
                "SELECT run_id FROM runs WHERE kind = ? AND status IN ('interrupted', 'failed') "
                "AND json_extract_string(params, '$.fingerprint') = ? "
                "ORDER BY started_at DESC LIMIT 1",
                [kind, fingerprint],
            ).fetchone()
        return None if row is None else str(row[0])

    def reopen_run(self, run_id: str) -> None:
        """Mark an interrupted/failed run as running again, owned by this process."""
        with self.connect() as con:
            updated = con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, "
                "pid = ? WHERE run_id = ? AND status IN ('interrupted', 'failed') RETURNING run_id",
                [socket.gethostname(), os.getpid(), run_id],
            ).fetchall()
        if not updated:
            raise ValueError(f"run {run_id!r} is not an interrupted or failed run")

    @property
    def schema_version(self) -> int:
        with self.connect(read_only=True) as con:
            row = con.execute(
                "SELECT value FROM ledger_meta WHERE name = 'schema_version'"
            ).fetchone()
        return int(row[0])

    def runs(self, kind: str | None = None, dataset: str | None = None) -> list[RunRecord]:
        """Runs, newest first."""
        query = f"SELECT {_RUN_COLS} FROM runs WHERE 1=1"
        args: list[Any] = []
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        if dataset is not None:
            query += " AND dataset = ?"
            args.append(dataset)
        return self._run_records(query + " ORDER BY started_at DESC", args)

    def run(self, run_id: str) -> RunRecord:
        """One run, as :meth:`runs` gives it; ``KeyError`` if there is none."""
        rows = self._run_records(f"SELECT {_RUN_COLS} FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return rows[0]

    def _run_records(self, query: str, args: list[Any]) -> list[RunRecord]:
        return [
            RunRecord.model_validate(row) for row in self._select(query, args, ("params", "stats"))
        ]

    # Decision tables (append-only) ------------------------------------------------------

    def _select(
        self, query: str, args: list[Any], json_fields: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        with self.connect(read_only=True) as con:
            cur = con.execute(query, args)
            cols = [d[0] for d in cur.description]
            rows = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
        for row in rows:
            for field in json_fields:
                if field in row:
                    row[field] = json.loads(row[field]) if row[field] else {}
        return rows

    def record_audit(
        self,
        run_id: str,
        *,
        dataset: str,
        attribute: str,
        groups: dict[str, Any],
        passed: bool,
        summary: dict[str, Any] | None = None,
    ) -> str:
        """Record one attribute's fairness audit of a run; returns the audit id.

        Args:
            groups: Per-group statistics, e.g. ``{"female": {"n": 40, "removed": 2}}``.
            summary: Overall statistics (four-fifths ratio, p-values, Cramér's V, ...).
        """
        audit_id = f"audit-{uuid.uuid4().hex}"
        with self.connect() as con:
            con.execute(
                "INSERT INTO audits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    audit_id,
                    run_id,
                    dataset,
                    attribute,
                    _json(groups),
                    _json(summary or {}),
                    bool(passed),
                    _now(),
                ],
            )
        return audit_id

    def audits(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Audit rows (of one run, or all), oldest first, with JSON fields decoded."""
        query, args = "SELECT * FROM audits", []
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", [run_id]
        return self._select(query + " ORDER BY created_at, audit_id", args, ("groups", "summary"))

    def record_gate_check(
        self,
        run_id: str,
        *,
        name: str,
        passed: bool,
        policy_version: str,
        value_before: float | None = None,
        value_after: float | None = None,
        threshold: float | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> str:
        """Record one gate check with the policy version that decided it; returns its id."""
        check_id = f"check-{uuid.uuid4().hex}"
        with self.connect() as con:
            con.execute(
                "INSERT INTO gate_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    check_id,
                    run_id,
                    name,
                    _float(value_before),
                    _float(value_after),
                    _float(threshold),
                    bool(passed),
                    policy_version,
                    _json(inputs or {}),
                    _now(),
                ],
            )
        return check_id

    def gate_checks(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Gate-check rows (of one run, or all), oldest first, with ``inputs`` decoded."""
        query, args = "SELECT * FROM gate_checks", []
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", [run_id]
        return self._select(query + " ORDER BY created_at, check_id", args, ("inputs",))

    def record_release(
        self,
        *,
        tag: str,
        dataset: str,
        n: int,
        kind: str,
        lance_table: str,
        lance_version: int,
        n_kept: int,
        n_removed: int,
        manifest: dict[str, Any],
        created_by: str,
    ) -> None:
        """Record a candidate or release tag. A tag, and a (dataset, kind, n), is recorded once:
        a second record raises ``ValueError``."""
        if kind not in RELEASE_KINDS:
            raise ValueError(f"unknown release kind {kind!r}; use one of {RELEASE_KINDS}")
        try:
            with self.connect() as con:
                con.execute(
                    "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        tag,
                        dataset,
                        int(n),
                        kind,
                        lance_table,
                        int(lance_version),
                        int(n_kept),
                        int(n_removed),
                        _json(manifest),
                        _now(),
                        created_by,
                    ],
                )
        except duckdb.ConstraintException as e:
            raise ValueError(
                f"release {tag!r} ({dataset} {kind} {n}) is already recorded: {e}"
            ) from e

    def releases(
        self, dataset: str | None = None, *, with_manifest: bool = False
    ) -> list[dict[str, Any]]:
        """Release rows, oldest first; manifests (which list every id) only when asked."""
        cols = "*" if with_manifest else "* EXCLUDE (manifest)"
        query, args = f"SELECT {cols} FROM releases", []
        if dataset is not None:
            query, args = query + " WHERE dataset = ?", [dataset]
        return self._select(query + " ORDER BY created_at, kind, n", args, ("manifest",))

    def release(self, tag: str) -> dict[str, Any]:
        """One release row with its manifest decoded; ``KeyError`` if the tag is unknown."""
        rows = self._select("SELECT * FROM releases WHERE tag = ?", [tag], ("manifest",))
        if not rows:
            raise KeyError(f"no release or candidate tagged {tag!r} in {self.path}")
        return rows[0]

    def record_decision(
        self, tag: str, *, action: str, actor: str, role: str, comment: str = ""
    ) -> str:
        """Append an attributed, timestamped decision on a tag; returns its id."""
        if action not in DECISION_ACTIONS:
            raise ValueError(f"unknown decision {action!r}; use one of {DECISION_ACTIONS}")
        if not actor.strip():
            raise ValueError("a decision needs an actor")
        if not role.strip():
            raise ValueError("a decision needs a role")
        decision_id = f"decision-{uuid.uuid4().hex}"
        with self.connect() as con:
            con.begin()
            try:
                _append_decisions(con, [(decision_id, tag, action, actor, role, comment, _now())])
                con.commit()
            except BaseException:
                con.rollback()
                raise
        return decision_id

    def record_approval(
        self,
        candidate: str,
        *,
        actor: str,
        role: str,
        comment: str,
        override: bool,
        release: dict[str, Any],
    ) -> None:
        """Record an approval in one transaction: the ``override`` decision (when given), the
        ``approve`` decision on ``candidate`` and the release row (``release``: the keyword
        arguments of :meth:`record_release`, less ``kind``).

        One transaction, so a crash leaves either all three rows or none: the candidate is
        never "approved" without its release row, and a retry finds it still pending.
        """
        if not actor.strip() or not role.strip():
            raise ValueError("a decision needs an actor and a role")
        now = _now()
        actions = (["override"] if override else []) + ["approve"]
        try:
            with self.connect() as con:
                con.begin()
                try:
                    _append_decisions(con, [  # distinct times keep their order
                        (f"decision-{uuid.uuid4().hex}", candidate, action, actor, role, comment,
                         now + timedelta(microseconds=i))
                        for i, action in enumerate(actions)
                    ])  # fmt: skip
                    r = release
                    con.execute(
                        "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [r["tag"], r["dataset"], int(r["n"]), "release", r["lance_table"],
                         int(r["lance_version"]), int(r["n_kept"]), int(r["n_removed"]),
                         _json(r["manifest"]), now, r["created_by"]],
                    )  # fmt: skip
                    con.commit()
                except BaseException:
                    con.rollback()
                    raise
        except duckdb.ConstraintException as e:
            raise ValueError(f"release {release['tag']!r} is already recorded: {e}") from e

    def decisions(self, tag: str | None = None) -> list[dict[str, Any]]:
        """Decisions (on one tag, or all), oldest first."""
        query, args = "SELECT * FROM decisions", []
        if tag is not None:
            query, args = query + " WHERE tag = ?", [tag]
        rows = self._select(query + " ORDER BY created_at, decision_id", args)
        for row in rows:
            for field in ("seq", "prev_hash", "row_hash"):
                row.pop(field, None)
        return rows

    def decision_chain_problems(self, limit: int = 5) -> list[str]:
        """What is wrong with the decisions' hash chain (empty when it verifies).

        Checks that the sequence numbers run 1..n without gaps, that each row's hash is
        recomputed from its content and its predecessor's hash, and that the last row is the
        head recorded in ``ledger_meta``: a deleted, edited or hand-inserted decision row
        (the last one included) breaks one of these.
        """
        with self.connect(read_only=True) as con:
            rows = con.execute(
                f"SELECT seq, prev_hash, row_hash, {_DECISION_COLS} FROM decisions "
                "ORDER BY seq NULLS FIRST, created_at, decision_id"
            ).fetchall()
            head = con.execute(
                "SELECT value FROM ledger_meta WHERE name = ?", [_CHAIN_HEAD]
            ).fetchone()
        problems: list[str] = []
        prev, expect = "", 1
        for seq, prev_hash, row_hash, *content in rows:
            if seq is None or row_hash is None:
                problems.append(f"decision {content[0]} has no place in the chain (inserted?)")
            elif seq != expect:
                problems.append(
                    f"decision #{expect}" + (f"..#{seq - 1}" if seq - 1 > expect else "")
                    + f" missing before {content[0]} (deleted?)"
                )  # fmt: skip
            elif prev_hash != prev or row_hash != _decision_hash(prev, seq, content):
                problems.append(f"decision #{seq} ({content[0]}) does not match its hash (edited?)")
            if seq is not None:
                expect = seq + 1
            prev = row_hash or ""
        recorded = "0:" if head is None else str(head[0])
        actual = f"{expect - 1}:{prev}" if rows else "0:"
        if not problems and recorded != actual:
            n = recorded.split(":", 1)[0]
            problems.append(
                f"the chain head records {n} decisions; the table ends at #{expect - 1} "
                "(the last decisions deleted?)"
            )
        return problems[:limit]

    def check_decision_chain(self) -> None:
        """Raise :class:`LedgerTamperError` when :meth:`decision_chain_problems` finds any."""
        if problems := self.decision_chain_problems():
            raise LedgerTamperError(
                f"{self.path}: the decisions table was altered outside diffcurate: "
                + "; ".join(problems)
            )


def _decision_hash(prev: str, seq: int, content: list[Any] | tuple[Any, ...]) -> str:
    """sha256 over the previous hash, the sequence number and a decision's columns."""
    *text, created_at = content
    micros = (created_at.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    doc = json.dumps([prev, int(seq), *text, micros], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def _append_decisions(con: duckdb.DuckDBPyConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert decision rows (``_DECISION_COLS`` order) at the chain's end, inside the caller's
    transaction, and move the head."""
    last = con.execute(
        "SELECT seq, row_hash FROM decisions WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    seq, prev = (0, "") if last is None else (int(last[0]), str(last[1]))
    for row in rows:
        seq += 1
        digest = _decision_hash(prev, seq, row)  # TIMESTAMPTZ keeps the microseconds hashed
        con.execute(
            f"INSERT INTO decisions ({_DECISION_COLS}, seq, prev_hash, row_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [*row, seq, prev, digest],
        )
        prev = digest
    con.execute("INSERT OR REPLACE INTO ledger_meta VALUES (?, ?)", [_CHAIN_HEAD, f"{seq}:{prev}"])


def _chain_existing_decisions(con: duckdb.DuckDBPyConnection) -> None:
    """Schema 3 -> 4: add the chain columns and chain the rows present, oldest first."""
    con.begin()
    for col in ("seq BIGINT", "prev_hash VARCHAR", "row_hash VARCHAR"):
        con.execute(f"ALTER TABLE decisions ADD COLUMN IF NOT EXISTS {col}")
    rows = con.execute(
        f"SELECT {_DECISION_COLS} FROM decisions ORDER BY created_at, decision_id"
    ).fetchall()
    prev = ""
    for seq, row in enumerate(rows, start=1):
        digest = _decision_hash(prev, seq, row)
        con.execute(
            "UPDATE decisions SET seq = ?, prev_hash = ?, row_hash = ? WHERE decision_id = ?",
            [seq, prev, digest, row[0]],
        )
        prev = digest
    con.execute(
        "INSERT OR REPLACE INTO ledger_meta VALUES (?, ?)", [_CHAIN_HEAD, f"{len(rows)}:{prev}"]
    )
    con.commit()


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)
