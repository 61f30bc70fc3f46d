"""The DuckDB ledger: what ran, when, on what, with what outcome.

The orchestrating process is the only writer (DuckDB allows one writing process per file), and
it holds the file open only for the duration of each write so readers such as the dashboard are
never locked out for a whole run. Bulk rows never go here; they go to LanceDB.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

SCHEMA_VERSION = 1

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
]


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


class Ledger:
    """Append-mostly record of runs in ``ledger.duckdb``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            for stmt in _DDL:
                con.execute(stmt)
            con.execute(
                "INSERT OR IGNORE INTO ledger_meta VALUES ('schema_version', ?)",
                [str(SCHEMA_VERSION)],
            )

    @contextmanager
    def _connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        con = duckdb.connect(str(self.path), read_only=read_only)
        try:
            yield con
        finally:
            con.close()

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
        with self._connect() as con:
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
        with self._connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, "
                "seconds = epoch_ms(?::TIMESTAMPTZ - started_at) / 1000.0, "
                "stats = ?, error = ? WHERE run_id = ?",
                [status, finished, finished, json.dumps(stats or {}, default=str), error, run_id],
            )

    def mark_interrupted(self) -> list[str]:
        """Mark runs of this host whose process died without finishing (SIGKILL, power loss)."""
        host = socket.gethostname()
        with self._connect() as con:
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
        with self._connect(read_only=True) as con:
            row = con.execute(
                "SELECT run_id FROM runs WHERE kind = ? AND status IN ('interrupted', 'failed') "
                "AND json_extract_string(params, '$.fingerprint') = ? "
                "ORDER BY started_at DESC LIMIT 1",
                [kind, fingerprint],
            ).fetchone()
        return None if row is None else str(row[0])

    def reopen_run(self, run_id: str) -> None:
        """Mark an interrupted/failed run as running again, owned by this process."""
        with self._connect() as con:
            updated = con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, host = ?, "
                "pid = ? WHERE run_id = ? AND status IN ('interrupted', 'failed') RETURNING run_id",
                [socket.gethostname(), os.getpid(), run_id],
            ).fetchall()
        if not updated:
            raise ValueError(f"run {run_id!r} is not an interrupted or failed run")

    def runs(self, kind: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, as dicts with ``params``/``stats`` decoded."""
        query = "SELECT * FROM runs WHERE 1=1"
        args: list[Any] = []
        if kind is not None:
            query += " AND kind = ?"
            args.append(kind)
        if dataset is not None:
            query += " AND dataset = ?"
            args.append(dataset)
        query += " ORDER BY started_at DESC"
        with self._connect(read_only=True) as con:
            cur = con.execute(query, args)
            cols = [d[0] for d in cur.description]
            out = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
        for row in out:
            for field in ("params", "stats"):
                row[field] = json.loads(row[field]) if row[field] else {}
        return out

    def run(self, run_id: str) -> dict[str, Any]:
        matches = [r for r in self.runs() if r["run_id"] == run_id]
        if not matches:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return matches[0]
