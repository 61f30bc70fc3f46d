"""Sessions follow the users table, the login throttle keys on (socket address, account),
request bodies are capped before they are read, cookies can be Secure, and an unusable ledger
is told apart: 503 with Retry-After for a lock, a logged 500 for a truncated file."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dashboards.conftest import csrf_of, login
from diffcurate.cli import app as cli
from diffcurate.dashboards.app import create_app
from diffcurate.dashboards.security import (
    LOGIN_CSRF_COOKIE,
    MAX_FORM_BYTES,
    SESSION_COOKIE,
    UserLookup,
)
from diffcurate.storage import ledger as ledger_mod
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.users import ROLES, UserStore, hash_token
from storage.test_ledger_errors import hold_write_lock

TAG = "digits-candidate-1"
BIG = 200 * 1024 * 1024


@pytest.fixture
def ws(tmp_path) -> Path:
    """A workspace with one run and no Lance tables: enough for sessions and logins."""
    ws = tmp_path / "ws"
    (ws / "lancedb").mkdir(parents=True)
    ledger = Ledger(ws / "ledger.duckdb")
    ledger.finish_run(ledger.start_run("ingest", dataset="digits"), status="completed")
    return ws


@pytest.fixture
def tokens(ws) -> dict[str, str]:
    store = UserStore(ws / "ledger.duckdb")
    return {r: store.add(r, r) for r in ROLES}


def try_login(client: TestClient, token: str, user: str | None = None, **headers) -> int:
    form = client.get("/login")
    data = {"csrf_token": csrf_of(form.text), "token": token}
    if user is not None:
        data["user"] = user
    return client.post("/login", data=data, headers=headers, follow_redirects=False).status_code


# Sessions -----------------------------------------------------------------------------------
def test_a_removed_users_open_session_is_refused(ws, tokens):
    client = TestClient(create_app(ws))
    csrf = login(client, tokens["reviewer"])
    res = CliRunner().invoke(cli, ["users", "remove", "reviewer", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert client.get("/runs", follow_redirects=False).status_code == 303  # to /login
    r = client.post(f"/releases/{TAG}/samples/{'a' * 24}/mark",
                    data={"csrf_token": csrf, "mark": "keep"}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 401
    assert try_login(client, tokens["reviewer"]) == 401  # the token is gone too
    res = CliRunner().invoke(cli, ["users", "remove", "reviewer", "-w", str(ws)])
    assert res.exit_code == 2 and "no user 'reviewer'" in res.output


def test_a_downgraded_approvers_open_session_cannot_approve(ws, tokens):
    client = TestClient(create_app(ws))
    csrf = login(client, tokens["approver"])
    res = CliRunner().invoke(cli, ["users", "set-role", "approver", "viewer", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    r = client.post(f"/releases/{TAG}/approve", data={"csrf_token": csrf, "comment": "ok"},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 403 and "you are viewer" in r.text
    # An upgrade applies to the open session as well.
    CliRunner().invoke(cli, ["users", "set-role", "approver", "reviewer", "-w", str(ws)])
    r = client.post(f"/releases/{TAG}/reject", data={"csrf_token": csrf, "comment": "no"})
    assert r.status_code == 403 and "you are reviewer" in r.text
    res = CliRunner().invoke(cli, ["users", "set-role", "approver", "admin", "-w", str(ws)])
    assert res.exit_code == 2 and "unknown role" in res.output


# Throttle ------------------------------------------------------------------------------------
def test_bad_tries_lock_out_only_the_account_they_name(ws, tokens):
    client = TestClient(create_app(ws), client=("10.1.1.1", 4000))
    assert [try_login(client, "dct_wrong") for _ in range(10)] == [401] * 10
    assert [try_login(client, "dct_wrong", "viewer") for _ in range(10)] == [401] * 10
    assert try_login(client, "dct_wrong") == 429
    assert try_login(client, tokens["viewer"], "viewer") == 429  # that account, this address
    assert try_login(client, tokens["approver"], "approver") == 303  # another account
    # A correct token under another account's name is a failed try.
    assert try_login(TestClient(client.app), tokens["reviewer"], "approver") == 401


def test_forwarded_for_counts_only_from_a_trusted_proxy(ws):
    untrusted = TestClient(create_app(ws), client=("127.0.0.1", 4000))
    codes = [try_login(untrusted, "dct_wrong", **{"X-Forwarded-For": f"10.0.0.{i}"})
             for i in range(12)]  # fmt: skip
    assert codes[-2:] == [429, 429]
    behind_proxy = TestClient(create_app(ws, trusted_proxies=["127.0.0.1"]),
                              client=("127.0.0.1", 4000))  # fmt: skip
    codes = [try_login(behind_proxy, "dct_wrong", **{"X-Forwarded-For": f"10.0.0.{i}"})
             for i in range(12)]  # fmt: skip
    assert codes == [401] * 12  # twelve clients behind the proxy
    # Hops left of the proxy's own are the client's to choose: they do not make a new key.
    codes = [try_login(behind_proxy, "dct_wrong", **{"X-Forwarded-For": f"6.6.6.{i}, 10.0.0.99"})
             for i in range(12)]  # fmt: skip
    assert codes[-2:] == [429, 429]


# The served app (what `diffcurate serve` runs) ------------------------------------------------
@pytest.fixture
def serve(monkeypatch):
    """Run ``diffcurate serve ARGS`` with uvicorn started as the command asks, in a thread;
    returns the base URL."""
    started = []

    def run(app, **kwargs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            kwargs["port"] = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, **kwargs))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        started.append((server, thread, kwargs["port"]))

    monkeypatch.setattr(uvicorn, "run", run)

    def start(*args: str) -> str:
        res = CliRunner().invoke(cli, ["serve", *args])
        assert res.exit_code == 0, res.output
        return f"http://127.0.0.1:{started[-1][2]}"

    yield start
    for server, thread, _ in started:
        server.should_exit = True
        thread.join(10)


def served_login(base: str, token: str, **headers) -> httpx.Response:
    form = httpx.get(f"{base}/login")
    csrf = form.cookies[LOGIN_CSRF_COOKIE]
    return httpx.post(f"{base}/login", data={"csrf_token": csrf, "token": token},
                      headers={"Cookie": f"{LOGIN_CSRF_COOKIE}={csrf}", **headers})  # fmt: skip


def test_served_app_ignores_forged_forwarded_for(ws, tokens, serve):
    base = serve("-w", str(ws))
    codes = [served_login(base, "dct_wrong", **{"X-Forwarded-For": f"10.0.0.{i}"}).status_code
             for i in range(12)]  # fmt: skip
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]


def test_secure_cookie_option(ws, tokens, serve):
    secure = served_login(serve("-w", str(ws), "--secure-cookie"), tokens["viewer"])
    assert secure.status_code == 303
    cookie = secure.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "secure" in cookie.lower()
    plain = served_login(serve("-w", str(ws)), tokens["viewer"])
    assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()


def test_served_app_refuses_a_large_post_before_reading_it(ws, serve):
    base = serve("-w", str(ws))
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  + f"Content-Length: {BIG}\r\n\r\n".encode() + b"token=aaaa")  # fmt: skip
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# Request size (the ASGI app itself: how much of the body it pulls) ---------------------------
def call(app, headers: list[tuple[bytes, bytes]], chunks) -> tuple[int, int]:
    """POST /login through the ASGI interface; returns (status, body bytes the app pulled)."""
    pulled = 0
    status = []

    async def receive():
        nonlocal pulled
        body, more = next(chunks)
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/login", "raw_path": b"/login",
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("10.2.2.2", 5000), "server": ("testserver", 80)}  # fmt: skip
    # A thread of its own: the browser tests leave an event loop running on this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    return status[0], pulled


def test_a_declared_large_body_is_refused_unread(ws):
    def chunks():  # 4 MiB of the declared 200 MiB: what a server that reads would pull
        for i in range(64):
            yield b"x" * 65536, i < 63

    headers = [(b"content-type", b"application/x-www-form-urlencoded"),
               (b"content-length", str(BIG).encode())]  # fmt: skip
    assert call(create_app(ws), headers, chunks()) == (413, 0)


def test_a_chunked_body_is_refused_at_the_cap(ws):
    def chunks():  # 4 MiB, chunked
        for i in range(256):
            yield b"x" * 16384, i < 255

    headers = [(b"content-type", b"application/x-www-form-urlencoded"),
               (b"transfer-encoding", b"chunked")]  # fmt: skip
    status, pulled = call(create_app(ws), headers, chunks())
    assert status == 413 and pulled <= MAX_FORM_BYTES + 16384


# Ledger errors ------------------------------------------------------------------------------
def test_a_truncated_ledger_is_a_logged_500_not_503(ws, tokens, caplog):
    client = TestClient(create_app(ws))
    login(client, tokens["viewer"])
    path = ws / "ledger.duckdb"
    path.write_bytes(path.read_bytes()[:4096])
    with caplog.at_level(logging.ERROR, logger="diffcurate.dashboards.app"):
        r = client.get("/runs")
    assert r.status_code == 500 and "Ledger unreadable" in r.text and "Retry-After" not in r.headers
    assert any("cannot be read" in rec.getMessage() for rec in caplog.records)


def test_a_held_ledger_lock_is_503_with_retry_after(ws, tokens, monkeypatch):
    client = TestClient(create_app(ws))
    login(client, tokens["viewer"])
    assert client.app.state.data.ledger.lock_wait < ledger_mod.LOCK_WAIT_S  # pages wait less
    monkeypatch.setattr(ledger_mod, "LOCK_WAIT_S", 0.3)
    client.app.state.data.ledger.lock_wait = 0.3
    client.app.state.data.users.ledger.lock_wait = 0.3
    holder = hold_write_lock(ws / "ledger.duckdb", 30)
    try:
        r = client.get("/runs")
    finally:
        holder.kill()
        holder.wait(10)
    assert r.status_code == 503 and "Ledger busy" in r.text
    assert r.headers["Retry-After"].isdigit()
    assert client.get("/runs").status_code == 200  # and it clears


def test_user_lookup_reads_the_ledger_again_after_any_write(ws, tokens):
    store = UserStore(ws / "ledger.duckdb")
    calls = []

    def fetch(token_hash):
        calls.append(token_hash)
        return store.by_token_hash(token_hash)

    lookup = UserLookup(ws / "ledger.duckdb", fetch, max_age=60)
    viewer = hash_token(tokens["viewer"])
    assert [lookup(viewer).role for _ in range(20)] == ["viewer"] * 20
    assert len(calls) == 1  # pages with dozens of thumbnails do not reopen the ledger
    store.set_role("viewer", "reviewer")
    assert lookup(viewer).role == "reviewer"
    store.remove("viewer")
    assert lookup(viewer) is None and len(calls) == 3
    stale = UserLookup(ws / "ledger.duckdb", fetch, max_age=0)
    stale(viewer), stale(viewer)
    assert len(calls) == 5  # the age bound holds even when the file looks unchanged
