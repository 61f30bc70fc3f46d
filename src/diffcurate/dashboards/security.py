"""Sessions, roles, CSRF and identifier patterns of the review app.

Every state-changing route is declared with :func:`Policy` (the role it needs, or ``public`` for
the login form) and guarded by :func:`guard`, which refuses, before the handler runs:
anonymous requests (401), a role below the route's (403), and a missing or wrong CSRF token
(403). A route table without a policy for some non-GET route is refused when the app is built.

Sessions live in server memory (a restart logs everyone out) and are checked against the
``users`` table on every request: removing a user ends their sessions, a role change applies to
the next request. The session cookie is HttpOnly and SameSite=Strict (and Secure with
``serve --secure-cookie``); each session has its own CSRF token, sent back in a hidden form
field. The login form, which has no session yet, uses a double-submit cookie instead.

Failed logins are throttled per (client address, account named in the form), so bad tries
never lock a correct token out for everyone behind one address. The client address is the
socket's peer; ``X-Forwarded-For`` counts only when the peer is a configured trusted proxy.
Request bodies are capped by :class:`BodyLimit` before they are read.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from diffcurate.storage.users import ROLES, User

SESSION_COOKIE = "dc_session"
LOGIN_CSRF_COOKIE = "dc_login_csrf"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 12 * 3600
MAX_FORM_BYTES = 64 * 1024
PUBLIC = "public"

# Identifiers accepted in URLs. Anything else is refused before it reaches storage.
RUN_ID = r"^[a-z][a-z_]{0,31}-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$"
SAMPLE_ID = r"^[0-9a-f]{24}$"
TAG = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}-(candidate|release)-[1-9][0-9]{0,8}$"
PHASE = r"^(before|after)$"


@dataclass
class Session:
    user: User
    csrf: str
    expires: float
    token_hash: str = ""
    """The hash of the token that opened the session: how each request finds its user again."""


@dataclass
class Sessions:
    """In-memory session table (thread-safe).

    Attributes:
        lookup: The current user holding a token hash, or None (removed, or token replaced).
            When set, :meth:`get` calls it on every request, so a session never outlives its
            user's row or keeps a role the user no longer has.
    """

    seconds: float = SESSION_SECONDS
    lookup: Callable[[str], User | None] | None = None
    _by_id: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: User, token_hash: str = "") -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32),
                          expires=time.time() + self.seconds, token_hash=token_hash)  # fmt: skip
        with self._lock:
            now = time.time()
            for k in [k for k, s in self._by_id.items() if s.expires < now]:
                del self._by_id[k]
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is None or session.expires < time.time():
                self._by_id.pop(sid, None)
                return None
        if self.lookup is not None:
            user = self.lookup(session.token_hash)
            if user is None:
                self.drop(sid)
                return None
            session.user = user
        return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class UserLookup:
    """The user holding a token hash, as the ledger's ``users`` table says now (cached).

    Opening the ledger costs milliseconds, and a page loads dozens of thumbnails. Answers are
    kept while the ledger file and its WAL keep their size, mtime and inode (a read leaves
    them alone; any write, such as ``users remove``, changes them), and never longer than
    ``max_age`` seconds, so a change made while the signature did not move still applies.
    """

    def __init__(self, path, fetch: Callable[[str], User | None], max_age: float = 2.0) -> None:
        self.path, self.fetch, self.max_age = path, fetch, max_age
        self._signature: tuple | None = None
        self._since = 0.0
        self._users: dict[str, User | None] = {}
        self._lock = threading.Lock()

    def _stat(self) -> tuple:
        out = []
        for p in (str(self.path), f"{self.path}.wal"):
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def __call__(self, token_hash: str) -> User | None:
        signature, now = self._stat(), time.monotonic()
        with self._lock:
            if signature != self._signature or now - self._since > self.max_age:
                self._signature, self._since, self._users = signature, now, {}
            if token_hash in self._users:
                return self._users[token_hash]
        user = self.fetch(token_hash)
        with self._lock:
            if self._signature == signature:
                self._users[token_hash] = user
        return user


class LoginThrottle:
    """At most ``limit`` failed logins per (client address, account) per ``window`` seconds.

    Only failures count, and per account: bad tries naming one account (or none) do not
    lock out another account's correct token from the same address, e.g. everyone behind
    one proxy or NAT. ``account`` is the user name the form gives ('' when it gives none).
    """

    MAX_KEYS = 10_000
    """Keys kept before stale ones are pruned (forged account names cannot grow memory)."""

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._fails: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str, account: str = "") -> bool:
        with self._lock:
            now = time.time()
            key = (client, account)
            recent = [t for t in self._fails.get(key, []) if now - t < self.window]
            if recent:
                self._fails[key] = recent
            else:
                self._fails.pop(key, None)
            return len(recent) >= self.limit

    def failed(self, client: str, account: str = "") -> None:
        with self._lock:
            now = time.time()
            if len(self._fails) >= self.MAX_KEYS:
                for k in [k for k, ts in self._fails.items() if now - ts[-1] >= self.window]:
                    del self._fails[k]
            self._fails.setdefault((client, account), []).append(now)


def client_address(request: Request, trusted_proxies: Iterable[str] = ()) -> str:
    """The address a request comes from, for throttling.

    The socket's peer, unless that peer is a trusted proxy: then the right-most
    ``X-Forwarded-For`` hop that is not itself a trusted proxy (hops further left are
    whatever the client chose to send).
    """
    peer = request.client.host if request.client else "?"
    trusted = set(trusted_proxies)
    if peer not in trusted:
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",")]
    for hop in reversed([h for h in hops if h]):
        if hop not in trusted:
            return hop
    return peer


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413, unread.

    A ``Content-Length`` over the cap is answered before any byte of the body is received;
    a chunked body is counted as it streams and refused as soon as it passes the cap, so an
    anonymous client cannot make the server buffer a large upload.
    """

    def __init__(self, app, max_bytes: int = MAX_FORM_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = True
            if too_large:
                await _too_large(send)
                return
        received = 0

        async def capped():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, capped, send)


async def _too_large(send) -> None:
    body = b"request body too large"
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class NotLoggedIn(Exception):
    """Raised for anonymous page views; the app answers with a redirect to the login page."""


async def form_fields(request: Request) -> dict[str, str]:
    """The urlencoded form body as ``{name: first value}`` (size-limited)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    ctype = request.headers.get("content-type", "")
    if body and not ctype.startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, "send an urlencoded form")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise HTTPException(400, "form is not UTF-8") from None
    return {k: v[0] for k, v in parsed.items()}


def _same_origin(request: Request) -> bool:
    """A browser's Origin header, when sent, must name this server."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def current_session(request: Request) -> Session | None:
    """The request's session, looked up (and checked against the users table) once."""
    cached = getattr(request.state, "dc_session", _UNSET)
    if cached is not _UNSET:
        return cached
    sessions: Sessions = request.app.state.sessions
    session = sessions.get(request.cookies.get(SESSION_COOKIE))
    request.state.dc_session = session
    return session


_UNSET = object()


async def viewer(request: Request) -> Session:
    """Dependency of every page: a logged-in user (any role), else a redirect to /login."""
    session = await run_in_threadpool(current_session, request)  # may read the ledger
    if session is None:
        raise NotLoggedIn()
    return session


def Policy(role: str) -> dict:
    """``openapi_extra`` marking a state-changing route with the role it needs."""
    if role != PUBLIC and role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return {"x-diffcurate-role": role}


def route_role(route) -> str | None:
    return (getattr(route, "openapi_extra", None) or {}).get("x-diffcurate-role")


def guard(role: str):
    """Dependency for a state-changing route: session, role and CSRF, checked in that order.

    Returns the session (None for public routes) and leaves the parsed form in
    ``request.state.form``.
    """

    async def check(request: Request) -> Session | None:
        if not _same_origin(request):
            raise HTTPException(403, "cross-origin request refused")
        fields = await form_fields(request)
        request.state.form = fields
        sent = fields.get(CSRF_FIELD, "") or request.headers.get("x-csrf-token", "")
        if role == PUBLIC:
            expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
            if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
                raise HTTPException(403, "missing or invalid CSRF token: reload the page")
            return None
        session = await run_in_threadpool(current_session, request)
        if session is None:
            raise HTTPException(401, "log in first")
        if not session.user.can(role):
            raise HTTPException(403, f"this needs the {role} role (you are {session.user.role})")
        if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page")
        return session

    return check
