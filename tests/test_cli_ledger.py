"""Read commands on a ledger another process holds, one this user may not write, and a
truncated one: a result or one line on stderr with exit 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.config import load_settings
from diffcurate.storage import ledger as ledger_mod
from diffcurate.storage import releases as rel
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.users import UserStore
from storage.test_ledger_errors import hold_write_lock
from storage.test_releases import sample_rows

runner = CliRunner()
NOBODY = 65534


def small_workspace(ws: Path) -> Path:
    """A workspace with one run and one user (no Lance tables needed by these commands)."""
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "lancedb").mkdir(exist_ok=True)
    ledger = Ledger(ws / "ledger.duckdb")
    ledger.finish_run(ledger.start_run("ingest", dataset="digits"), status="completed")
    UserStore(ws / "ledger.duckdb").add("alice", "viewer")
    return ws


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_runs_succeeds_after_a_short_write_lock(tmp_path):
    ws = small_workspace(tmp_path / "ws")
    holder = hold_write_lock(ws / "ledger.duckdb", 1.0)
    try:
        res = runner.invoke(app, ["runs", "--json", "-w", str(ws)])
    finally:
        holder.wait(10)
    assert res.exit_code == 0, res.output
    assert '"kind": "ingest"' in res.output


LOCKED_COMMANDS = [
    ["runs"], ["users", "list"], ["release", "list"], ["users", "add", "bob", "--role", "viewer"],
    ["release", "approve", "digits-candidate-1", "--actor", "ana", "--comment", "ok"],
]  # fmt: skip


@pytest.mark.parametrize("args", LOCKED_COMMANDS)
def test_a_ledger_locked_past_the_budget_is_one_line(tmp_path, monkeypatch, args):
    ws = small_workspace(tmp_path / "ws")
    monkeypatch.setattr(ledger_mod, "LOCK_WAIT_S", 0.3)
    holder = hold_write_lock(ws / "ledger.duckdb", 30)
    try:
        res = runner.invoke(app, [*args, "-w", str(ws)])
    finally:
        holder.kill()
        holder.wait(10)
    assert "is locked by another process" in one_error_line(res)


@pytest.fixture
def candidate_ws(workspace, digit_files) -> Path:
    """A workspace with 12 digit samples and the pending candidate digits-candidate-1."""
    settings = load_settings(workspace)
    store = LanceStore(settings.layout.lancedb_uri)
    store.insert_new("samples", sample_rows(digit_files[:12], "digits"))
    ids = sorted(store.read("samples", columns=["sample_id"])["sample_id"].to_pylist())
    rel.create_candidate(store, Ledger(settings.layout.ledger_path), "digits", ids[2:], ids[:2],
                         {"gate_passed": True})  # fmt: skip
    return workspace


def test_release_approve_waits_out_a_short_lock(candidate_ws):
    workspace, ledger = candidate_ws, Ledger(candidate_ws / "ledger.duckdb")
    holder = hold_write_lock(ledger.path, 1.0)
    try:
        res = runner.invoke(app, ["release", "approve", "digits-candidate-1", "--actor", "ana",
                                  "--comment", "ok", "-w", str(workspace)])  # fmt: skip
    finally:
        holder.wait(10)
    assert res.exit_code == 0, res.output
    assert [r["tag"] for r in ledger.releases() if r["kind"] == "release"] == ["digits-release-1"]


@pytest.mark.parametrize("args", [["runs"], ["users", "list"], ["release", "list"],
                                  ["release", "show", "digits-candidate-1"]])  # fmt: skip
def test_a_truncated_ledger_is_one_line(tmp_path, args):
    ws = small_workspace(tmp_path / "ws")
    path = ws / "ledger.duckdb"
    path.write_bytes(path.read_bytes()[:4096])
    assert "cannot be read" in one_error_line(runner.invoke(app, [*args, "-w", str(ws)]))


@pytest.fixture
def read_only_workspace():
    """A workspace this test's subprocesses may read but not write (they run as nobody when
    the tests run as root, who may write any file)."""
    root = Path(tempfile.mkdtemp(prefix="dc-ro-", dir="/tmp"))
    try:
        ws = small_workspace(root / "ws")
        token = UserStore(ws / "ledger.duckdb").add("carol", "viewer")
        for p in [root, *root.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield ws, token
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(root)


def as_reader(code: list[str], cwd: Path) -> subprocess.CompletedProcess:
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop write access")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        probe = subprocess.run([*prefix, sys.executable, "-c", "import diffcurate"], cwd=cwd,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("the checkout is not readable by an unprivileged user (a private "
                        "clone directory): cannot run the CLI without write access")  # fmt: skip
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("DIFFCURATE_WORKSPACE", None)
    return subprocess.run([*prefix, sys.executable, *code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_read_commands_work_on_a_read_only_ledger(read_only_workspace):
    ws, token = read_only_workspace
    cli = ["-m", "diffcurate.cli"]
    for args in (["runs", "--json"], ["users", "list"], ["release", "list"]):
        res = as_reader([*cli, *args, "-w", str(ws)], ws.parent)
        assert res.returncode == 0, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert '"kind": "ingest"' in as_reader([*cli, "runs", "--json", "-w", str(ws)],
                                           ws.parent).stdout  # fmt: skip
    res = as_reader([*cli, "users", "add", "bob", "--role", "viewer", "-w", str(ws)], ws.parent)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "read-only" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # The dashboard (what `serve` runs) starts, logs in and shows pages on it.
    script = (
        "import sys; from starlette.testclient import TestClient; "
        "from diffcurate.dashboards.app import create_app; "
        "from dashboards.conftest import login; "
        f"c = TestClient(create_app({str(ws)!r})); login(c, {token!r}); "
        "assert 'ingest' in c.get('/runs').text; print('dashboard ok')"
    )
    res = as_reader(["-c", script], ws.parent)
    assert res.returncode == 0 and "dashboard ok" in res.stdout, res.stderr
