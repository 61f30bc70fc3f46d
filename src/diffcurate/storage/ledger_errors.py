"""Why the ledger file could not be used, as errors a user can act on.

DuckDB reports a held lock, a file this user may not write and a truncated or foreign file all
as ``duckdb.IOException``. The CLI turns these into one-line messages and the dashboard into
different answers (503 with Retry-After only for a lock), so they are told apart once, here.
This module imports nothing heavy: the CLI catches these errors without loading DuckDB.
"""

from __future__ import annotations

from pathlib import Path


class LedgerError(RuntimeError):
    """The ledger file could not be opened or read."""


class LedgerLocked(LedgerError):
    """Another process held DuckDB's file lock for the whole retry budget: try again."""


class LedgerReadOnly(LedgerError):
    """The ledger file (or its directory) is not writable by this user."""


class LedgerCorrupt(LedgerError):
    """The file is truncated, damaged or not a DuckDB database."""


def classify(path: Path, exc: BaseException, waited: float = 0.0) -> LedgerError:
    """The :class:`LedgerError` for a DuckDB error raised on ``path``."""
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Could not set lock" in text or "Conflicting lock" in text:
        holder = text.split("Conflicting lock is held in", 1)[-1].split(".", 1)[0].strip()
        by = f" (held by {holder})" if "Conflicting lock" in text else ""
        return LedgerLocked(
            f"the ledger {path} is locked by another process{by}; still locked after "
            f"{waited:.1f} s of retries: try again when it has finished writing"
        )
    if "Permission denied" in text or "Read-only file system" in text or "read-only" in text:
        return LedgerReadOnly(
            f"the ledger {path} is read-only for this user ({first}): commands that only read "
            "work; this one writes, so it needs write access to the file and its directory"
        )
    return LedgerCorrupt(
        f"the ledger {path} cannot be read ({first}): it is truncated, damaged or not a "
        "DuckDB file; restore it from a backup"
    )
