"""Sessions, roles, CSRF and identifier patterns of the review app.

Every state-changing route is declared with :func:`Policy` (the role it needs, or ``public`` for
the login form) and guarded by :func:`guard`, which refuses, before the handler runs:
anonymous requests (401), a role below the route's (403), and a missing or wrong CSRF token
(403). A route table without a policy for some non-GET route is refused when the app is built.

Sessions live in server memory (a restart logs everyone out). The session cookie is HttpOnly
and SameSite=Strict; each session has its own CSRF token, sent back in a hidden form field.
The login form, which has no session yet, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

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


@dataclass
class Sessions:
    """In-memory session table (thread-safe)."""

    seconds: float = SESSION_SECONDS
    _by_id: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, user: User) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32),
                          expires=time.time() + self.seconds)  # fmt: skip
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
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class LoginThrottle:
    """At most ``limit`` failed logins per client address per ``window`` seconds."""

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        with self._lock:
            now = time.time()
            recent = [t for t in self._fails.get(client, []) if now - t < self.window]
            self._fails[client] = recent
            return len(recent) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._fails.setdefault(client, []).append(time.time())


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
    sessions: Sessions = request.app.state.sessions
    return sessions.get(request.cookies.get(SESSION_COOKIE))


async def viewer(request: Request) -> Session:
    """Dependency of every page: a logged-in user (any role), else a redirect to /login."""
    session = current_session(request)
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
        session = current_session(request)
        if session is None:
            raise HTTPException(401, "log in first")
        if not session.user.can(role):
            raise HTTPException(403, f"this needs the {role} role (you are {session.user.role})")
        if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise HTTPException(403, "missing or invalid CSRF token: reload the page")
        return session

    return check
