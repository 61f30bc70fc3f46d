"""A ledger another process holds, one this user may not write, and a truncated one: each
opens with a bounded retry or fails with its own :class:`LedgerError`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffcurate.storage import ledger as ledger_mod
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.ledger_errors import LedgerCorrupt, LedgerLocked


def hold_write_lock(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a read-write DuckDB connection to ``path`` for ``seconds``."""
    code = (f"import duckdb, time; c = duckdb.connect({str(path)!r}); "
            f"print('held', flush=True); time.sleep({seconds})")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def ledger_with_a_run(path: Path) -> Ledger:
    ledger = Ledger(path)
    ledger.finish_run(ledger.start_run("ingest", dataset="digits"), status="completed")
    return ledger


def test_opening_an_up_to_date_ledger_only_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "ledger.duckdb"
    ledger_with_a_run(path)
    opened = []
    real = ledger_mod.duckdb.connect

    def spy(database, read_only=False, **kw):
        opened.append(read_only)
        return real(database, read_only=read_only, **kw)

    monkeypatch.setattr(ledger_mod.duckdb, "connect", spy)
    assert len(Ledger(path).runs()) == 1
    assert opened and all(opened), "a read opened the ledger read-write"


def test_a_read_waits_out_a_short_write_lock(tmp_path):
    path = tmp_path / "ledger.duckdb"
    ledger = ledger_with_a_run(path)
    holder = hold_write_lock(path, 1.0)
    try:
        t0 = time.monotonic()
        assert len(ledger.runs()) == 1
        assert time.monotonic() - t0 > 0.2  # it did wait for the lock
    finally:
        holder.wait(10)


def test_a_lock_held_past_the_budget_is_a_ledger_locked_error(tmp_path):
    path = tmp_path / "ledger.duckdb"
    ledger_with_a_run(path)
    holder = hold_write_lock(path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LedgerLocked, match="locked by another process"):
            Ledger(path, lock_wait=0.5).runs()
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait(10)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_ledger_is_a_ledger_corrupt_error(tmp_path, keep):
    path = tmp_path / "ledger.duckdb"
    ledger_with_a_run(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LedgerCorrupt, match="cannot be read"):
        Ledger(path).runs()
