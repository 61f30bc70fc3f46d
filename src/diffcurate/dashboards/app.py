"""The review app: FastAPI routes rendering Jinja2 templates, server-side only.

Pages (any logged-in user): runs, run detail (score histogram, per-layer plot, flagged grid),
audit, gates, releases, release detail. Actions (POST, each with a :func:`~.security.Policy`):
reviewer marks keep/remove; approver approves or rejects through
:mod:`diffcurate.curation.approval`, the service ``diffcurate release approve|reject`` calls.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import duckdb
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcurate.curation import approval
from diffcurate.dashboards import plots
from diffcurate.dashboards.data import DashboardData, NotFound
from diffcurate.dashboards.security import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    PHASE,
    PUBLIC,
    RUN_ID,
    SAMPLE_ID,
    SESSION_COOKIE,
    TAG,
    BodyLimit,
    LoginThrottle,
    NotLoggedIn,
    Policy,
    Session,
    Sessions,
    UserLookup,
    client_address,
    current_session,
    guard,
    route_role,
    viewer,
)
from diffcurate.dashboards.thumbs import thumbnail_png
from diffcurate.metrics.memorization import DEFAULT_THRESHOLDS
from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.ledger import RunRecord
from diffcurate.storage.ledger_errors import LedgerError, LedgerLocked, LedgerReadOnly, classify
from diffcurate.storage.users import hash_token

HERE = Path(__file__).parent
log = logging.getLogger(__name__)
RETRY_AFTER_S = 2
"""What a 503 for a locked ledger tells clients to wait: writes hold the lock for moments."""
PAGE_LOCK_WAIT_S = 3.0
"""How long a request retries a held ledger lock (less than a command's: requests queue behind
the one waiting, and the 503 tells the browser when to try again)."""
PER_PAGE = 48
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# HTTP status of each kind of refusal of the approval service.
REFUSED_STATUS = {"not_found": 404, "invalid": 400, "forbidden": 403, "conflict": 409}
_NEXT = re.compile(r"^/(runs|releases)(/[A-Za-z0-9_.-]+)*/?(\?page=[0-9]{1,6})?$")

RunId = Annotated[str, PathParam(pattern=RUN_ID)]
SampleId = Annotated[str, PathParam(pattern=SAMPLE_ID)]
Tag = Annotated[str, PathParam(pattern=TAG)]
Viewer = Annotated[Session, Depends(viewer)]


def create_app(
    workspace: Path, *, secure_cookies: bool = False, trusted_proxies: Iterable[str] = ()
) -> FastAPI:
    """The app serving one workspace (its ledger and LanceDB tables).

    Args:
        secure_cookies: Mark cookies Secure (the app is reached over HTTPS through a proxy).
        trusted_proxies: Peers whose ``X-Forwarded-For`` names the client for the login
            throttle; any other peer's header is ignored.
    """
    app = FastAPI(title="diffcurate review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.data = data = DashboardData(workspace)
    data.ledger.lock_wait = data.users.ledger.lock_wait = PAGE_LOCK_WAIT_S
    trusted = frozenset(trusted_proxies)

    def fetch(token_hash: str):
        with data.lock:
            return data.users.by_token_hash(token_hash)

    app.state.sessions = Sessions(lookup=UserLookup(data.ledger.path, fetch))
    app.state.throttle = LoginThrottle()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = plots.fmt
    templates.env.filters["duration"] = plots.duration
    templates.env.globals["CSRF_FIELD"] = CSRF_FIELD

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        try:
            session = current_session(request)
        except LedgerError:  # the error page of an unusable ledger: shown without a session
            session = None
        return templates.TemplateResponse(
            request, name, {"session": session, **ctx}, status_code=status
        )

    def ledger_error(request: Request, exc: LedgerError) -> HTMLResponse:
        """503 with Retry-After for a lock (it clears); 500 and an error log otherwise."""
        if isinstance(exc, LedgerLocked):
            log.warning("ledger busy on %s %s: %s", request.method, request.url.path, exc)
            message = "Another process is writing the ledger; reload in a moment."
            resp = page(request, "error.html", 503, title="Ledger busy", message=message)
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
            return resp
        log.error("ledger unusable on %s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc, LedgerReadOnly):
            title = "Ledger read-only"
            message = ("The server may not write the ledger, so nothing was recorded. Pages "
                       "still work; an operator must fix the file's permissions.")  # fmt: skip
        else:
            title = "Ledger unreadable"
            message = ("The ledger cannot be read: it is truncated, damaged or not a DuckDB "
                       "file. The server log has the details; an operator must restore it "
                       "from a backup.")  # fmt: skip
        return page(request, "error.html", 500, title=title, message=message)

    # SecurityHeaders is added last, so it wraps (and adds its headers to) BodyLimit's 413.
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(NotLoggedIn)
    async def to_login(request: Request, exc: NotLoggedIn):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        nxt = f"?next={quote(target, safe='')}" if _NEXT.match(target) else ""
        return RedirectResponse(f"/login{nxt}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return page(request, "error.html", 404, title="Not found",
                    message="No such page: an id in the address is malformed.")  # fmt: skip

    @app.exception_handler(LedgerError)
    async def unusable(request: Request, exc: LedgerError):
        return ledger_error(request, exc)

    @app.exception_handler(duckdb.IOException)
    async def io_error(request: Request, exc: duckdb.IOException):
        return ledger_error(request, classify(data.ledger.path, exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        titles = {401: "Log in first", 403: "Not allowed", 404: "Not found", 409: "Refused"}
        return page(
            request,
            "error.html",
            exc.status_code,
            title=titles.get(exc.status_code, "Error"),
            message=str(exc.detail),
        )

    # Public ------------------------------------------------------------------------------
    @app.get("/static/dashboard.css")
    def css() -> Response:
        return Response((HERE / "static" / "dashboard.css").read_bytes(), media_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})  # fmt: skip

    @app.get("/login")
    def login_form(request: Request, next: str = "") -> HTMLResponse:
        token = _token()
        resp = page(request, "login.html", login_csrf=token, next=_safe_next(next))
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=secure_cookies, max_age=3600)  # fmt: skip
        return resp

    @app.post("/login", openapi_extra=Policy(PUBLIC))
    def login(request: Request, _: Annotated[None, Depends(guard(PUBLIC))]) -> Response:
        form = request.state.form
        client = client_address(request, trusted)
        account = form.get("user", "").strip()[:64]
        if app.state.throttle.blocked(client, account):
            raise HTTPException(429, "too many failed logins; wait a minute")
        token = form.get("token", "").strip()
        with data.lock:
            user = data.users.authenticate(token)
        if user is not None and account and user.name != account:
            user = None
        if user is None:
            app.state.throttle.failed(client, account)
            token = _token()
            resp = page(request, "login.html", 401, login_csrf=token, error="Unknown token.",
                        next=_safe_next(form.get("next", "")))  # fmt: skip
            resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                            secure=secure_cookies, max_age=3600)  # fmt: skip
            return resp
        sid, _session = app.state.sessions.create(user, hash_token(token))
        resp = RedirectResponse(_safe_next(form.get("next", "")) or "/runs", status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict",
                        secure=secure_cookies)  # fmt: skip
        resp.delete_cookie(LOGIN_CSRF_COOKIE)
        return resp

    @app.post("/logout", openapi_extra=Policy("viewer"))
    def logout(request: Request, _: Annotated[Session, Depends(guard("viewer"))]) -> Response:
        app.state.sessions.drop(request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # Pages -------------------------------------------------------------------------------
    @app.get("/")
    def home(session: Viewer) -> Response:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/runs")
    def runs(request: Request, session: Viewer) -> HTMLResponse:
        return page(request, "runs.html", runs=data.runs(), releases=data.release_status(),
                    tampered=data.release_problems())  # fmt: skip

    @app.get("/runs/{run_id}")
    def run_detail(
        request: Request, run_id: RunId, session: Viewer,
        page_no: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
    ) -> HTMLResponse:  # fmt: skip
        run = _run(data, run_id)
        if run.kind != "hygiene":
            return page(request, "run_other.html", run=run)
        stats = run.stats
        ctx: dict[str, Any] = {"run": run, "stats": stats, "tab": "flagged"}
        ctx.update(_release_ctx(data, stats.get("release_tag")))
        grid = data.flagged_page(run, page_no, PER_PAGE)
        ctx["grid"] = grid
        removed = grid.removed
        values, flagged = data.distinct_scores(run)
        policy = run.params.get("flag") or {}
        if policy.get("mode") == "threshold" and policy.get("threshold") is not None:
            threshold, label = float(policy["threshold"]), "policy threshold"
        else:  # top fraction: the riskiest distinct image that was not flagged lies below this
            lowest = [v for v, f in zip(values, flagged, strict=True) if f]
            threshold, label = (min(lowest) if lowest else None), "lowest flagged image"
        ctx["scorer"] = data.scorer_of(stats["score_run"]) if stats.get("score_run") else "risk"
        ctx["histogram"] = plots.histogram(
            values, flagged, threshold=threshold, threshold_label=label,
            title=f"{ctx['scorer']} score", unit="images",
        )  # fmt: skip
        layers = data.per_layer(stats["score_run"], removed) if stats.get("score_run") else None
        ctx["layers"] = None
        if layers:
            series = [plots.Series("all samples", layers["all"], plots.KEPT)]
            if layers["flagged"] is not None:
                series.append(plots.Series("flagged", layers["flagged"], plots.FLAGGED))
            ctx["layers"] = plots.hbars(layers["names"], series, title="mean per-layer score",
                                        width=560)  # fmt: skip
        secrets = set(stats.get("secrets") or [])
        ctx["generations"] = {
            t.sample_id: {
                p: (stats.get("per_secret") or {}).get(t.sample_id, {}).get(p)
                for p in ("before", "after")
                if _has_gate_image(data, run, p, t.sample_id)
            }
            for t in grid.tiles
            if t.sample_id in secrets
        }
        ctx["can_review"] = (ctx["candidate_open"] and current_session(request).user.can(
            "reviewer"))  # fmt: skip
        return page(request, "run.html", **ctx)

    @app.get("/runs/{run_id}/audit")
    def audit(request: Request, run_id: RunId, session: Viewer) -> HTMLResponse:
        run = _run(data, run_id)
        with data.lock:
            rows = data.ledger.audits(run_id)
        policy = run.params.get("audit") or {}
        ratio = float(policy.get("min_retention_ratio", 0.8))
        alpha = float(policy.get("alpha", 0.05))
        min_v = float(policy.get("min_effect_size", 0.0))
        charts, tests, why = [], [], []
        for a in rows:
            tests.append(_dependence_chart(a["summary"], alpha))
            why.append(_audit_reasons(a, ratio, alpha, min_v))
            groups = list(a["groups"].values())
            retention = [g["retention_rate"] for g in groups if g.get("included", True)]
            limit = 1 - ratio * max(retention) if retention else None
            labels = [f"{g['group']} (n={g['n']})" for g in groups]
            rates = [g["removal_rate"] for g in groups]
            charts.append(plots.hbars(
                labels, [plots.Series("removal rate", rates, plots.KEPT)], ref=limit,
                ref_label="four-fifths limit", percent=True,
                highlight=[limit is not None and r > limit + 1e-12 for r in rates],
                title=f"removal rate by {a['attribute']}",
            ))  # fmt: skip
        generations, gen_charts = _generations_view(run.stats.get("generations_audit"))
        return page(request, "audit.html", run=run, stats=run.stats, audits=rows,
                    charts=charts, tests=tests, why=why, ratio=ratio, alpha=alpha, tab="audit",
                    unit=_audit_unit(run.stats, rows), generations=generations,
                    gen_charts=gen_charts,
                    **_release_ctx(data, run.stats.get("release_tag")))  # fmt: skip

    @app.get("/runs/{run_id}/gates")
    def gates(request: Request, run_id: RunId, session: Viewer) -> HTMLResponse:
        run = _run(data, run_id)
        stats = run.stats
        with data.lock:
            checks = data.ledger.gate_checks(run_id)
        charts = []
        for c in checks:
            shown = _gate_chart_ref(c)
            if shown is None:
                continue
            ref, ref_label = shown
            charts.append(
                plots.hbars(
                    ["before", "after"],
                    [plots.Series(c["name"], [c["value_before"], c["value_after"]], plots.AFTER)],
                    ref=ref,
                    ref_label=ref_label,
                    width=420,
                    highlight=[False, not c["passed"]],
                    title=c["name"],
                )
            )
        secrets = [
            {"id": s, "before": (stats.get("per_secret") or {}).get(s, {}).get("before"),
             "after": (stats.get("per_secret") or {}).get(s, {}).get("after"),
             "has": {p: _has_gate_image(data, run, p, s) for p in ("before", "after")}}
            for s in (stats.get("secrets") or [])[:200]
        ]  # fmt: skip
        data.prefetch([s["id"] for s in secrets])
        tau = _mem_rule(run)
        for s in secrets:
            s["reconstructed"] = {p: _reconstructed(s[p], tau) for p in ("before", "after")}
        return page(request, "gates.html", run=run, stats=stats, checks=checks, charts=charts,
                    secrets=secrets, tau=tau, retrigger=_retrigger_view(stats), tab="gates",
                    **_release_ctx(data, stats.get("release_tag")))  # fmt: skip

    @app.get("/releases")
    def releases(request: Request, session: Viewer) -> HTMLResponse:
        infos = sorted(data.release_status().values(), key=lambda i: i.created_at, reverse=True)
        return page(request, "releases.html", releases=infos, tampered=data.release_problems(),
                    chain_problems=data.chain_problems())  # fmt: skip

    @app.get("/releases/{tag}")
    def release(request: Request, tag: Tag, session: Viewer, done: str = "") -> HTMLResponse:
        ctx = _release_ctx(data, tag, rows=True)
        if ctx["release"] is None:
            raise HTTPException(404, f"no candidate or release tagged {tag}")
        notes = {"approved": "Approved.", "rejected": "Rejected.", "marked": "Mark recorded."}
        data.prefetch(list(ctx["manifest"].get("removed_ids", []))[: ctx["n_removed_shown"]])
        return page(request, "release.html", notice=notes.get(done), **ctx)

    @app.get("/releases/{tag}/manifest.json")
    def manifest(tag: Tag, session: Viewer) -> Response:
        try:
            body = data.manifest_json(tag)
        except NotFound:
            raise HTTPException(404, f"no candidate or release tagged {tag}") from None
        return Response(
            body,
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{tag}.json"'},
        )

    @app.get("/thumbs/{sample_id}.png")
    async def thumb(sample_id: SampleId, session: Viewer) -> Response:
        try:  # a page prefetches its thumbnails: usually a cache hit, served on the event loop
            png = data.thumbs.get(sample_id) or await run_in_threadpool(data.thumbnail, sample_id)
        except NotFound:
            raise HTTPException(404, "no such sample") from None
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip

    @app.get("/runs/{run_id}/gate/{phase}/{secret_id}.png")
    def gate_image(
        run_id: RunId, phase: Annotated[str, PathParam(pattern=PHASE)], secret_id: SampleId,
        session: Viewer,
    ) -> Response:  # fmt: skip
        run = _run(data, run_id)
        try:
            path = data.gate_image_path(run, phase, secret_id)
        except NotFound:
            raise HTTPException(404, "no saved generation for this secret") from None
        return Response(thumbnail_png(path.read_bytes()), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip

    # Actions -----------------------------------------------------------------------------
    @app.post("/releases/{tag}/samples/{sample_id}/mark", openapi_extra=Policy("reviewer"))
    def mark(
        request: Request, tag: Tag, sample_id: SampleId,
        session: Annotated[Session, Depends(guard("reviewer"))],
    ) -> Response:  # fmt: skip
        form = request.state.form
        choice = form.get("mark", "")
        if choice not in reviews.MARKS:
            raise HTTPException(400, "mark must be keep or remove")
        comment = form.get("comment", "").strip()[:2000]
        with data.lock:
            row = _open_candidate(data, tag)
            ids = data.manifest_ids(tag)
            if sample_id not in set(ids["kept"]) | set(ids["removed"]):
                raise HTTPException(404, f"{sample_id} is not a sample of {tag}")
            index = data.index(row["dataset"])
            flagged = set(ids["removed"])  # marks are limited to flagged samples (the service)
            members = [s for s in index.members(sample_id) if s in flagged] or [sample_id]
            current = reviews.effective_marks(data.marks(tag)).get(sample_id)
            if not (
                current
                and current["mark"] == choice
                and current["actor"] == session.user.name
                and set(current["sample_ids"]) == set(members)
            ):
                try:
                    reviews.record_mark(data.ledger, tag, sample_id=sample_id, sample_ids=members,
                                        mark=choice, actor=session.user.name,
                                        role=session.user.role, comment=comment)  # fmt: skip
                except reviews.ReviewError as e:
                    raise HTTPException(409, str(e)) from e
        back = _safe_next(form.get("next", "")) or f"/releases/{tag}?done=marked"
        return RedirectResponse(f"{back}#s-{sample_id}", status_code=303)

    @app.post("/releases/{tag}/approve", openapi_extra=Policy("approver"))
    def approve(
        request: Request, tag: Tag, session: Annotated[Session, Depends(guard("approver"))]
    ) -> Response:
        form = request.state.form
        comment = form.get("comment", "").strip()[:4000]
        reason = form.get("override_reason", "").strip()[:4000]
        with data.lock:
            try:
                done = approval.approve(data.store, data.ledger, tag, session.user.name, comment,
                                        override_reason=reason)  # fmt: skip
            except approval.ApprovalRefused as e:
                raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from e
        return RedirectResponse(f"/releases/{done.approved}?done=approved", status_code=303)

    @app.post("/releases/{tag}/reject", openapi_extra=Policy("approver"))
    def reject(
        request: Request, tag: Tag, session: Annotated[Session, Depends(guard("approver"))]
    ) -> Response:
        comment = request.state.form.get("comment", "").strip()[:4000]
        with data.lock:
            try:
                approval.reject(data.store, data.ledger, tag, session.user.name, comment)
            except approval.ApprovalRefused as e:
                raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from e
        return RedirectResponse(f"/releases/{tag}?done=rejected", status_code=303)

    @app.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    check_policies(app)
    return app


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response (unless set)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


def check_policies(app: FastAPI) -> None:
    """Refuse a route table in which a state-changing route has no policy or no guard."""
    for route in app.routes:
        if not isinstance(route, APIRoute) or not (route.methods - {"GET", "HEAD"}):
            continue
        role = route_role(route)
        guarded = any(getattr(d.call, "__qualname__", "").startswith("guard.")
                      for d in route.dependant.dependencies)  # fmt: skip
        if role is None or not guarded:
            raise RuntimeError(f"{route.path} changes state without a Policy and guard()")


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _safe_next(target: str) -> str:
    """A local page to return to, or ''; never another host (open redirect)."""
    return target if target and _NEXT.match(target) else ""


def _run(data: DashboardData, run_id: str) -> RunRecord:
    try:
        return data.run(run_id)
    except NotFound:
        raise HTTPException(404, f"no run {run_id}") from None


def _gate_chart_ref(check: dict[str, Any]) -> tuple[float | None, str] | None:
    """Where a gate's limit lies in the units of its before/after values (None: no chart).

    ``utility_fd`` limits the relative increase, ``utility_kid`` the absolute one,
    ``memorization`` and ``memorization_retrigger`` the (re-trigger) Mem% after; the audit and
    no-increase checks are read from the table.
    """
    before, threshold = check["value_before"], check["threshold"]
    if check["value_before"] is None and check["value_after"] is None:
        return None
    name = check["name"]
    if name in ("memorization", "memorization_retrigger") and threshold is not None:
        return threshold, "limit"
    if name == "utility_fd" and before is not None and threshold is not None:
        return before * (1 + threshold), f"limit (+{100 * threshold:.0f}%)"
    if name == "utility_kid" and before is not None and threshold is not None:
        return before + threshold, "limit"
    if name in ("audit", "memorization_no_increase"):
        return None
    return None, ""


def _mem_rule(run: RunRecord) -> dict[str, Any]:
    """The reconstruction rule that judged the run: the τ (δ for ratio rules) it used, and how
    that value was set (calibrated on held-out images, or fixed)."""
    stats = run.stats
    configured = dict((run.params.get("measure") or {}).get("memorization") or {})
    metric = stats.get("mem_rule") or configured.get("metric") or "tiled_l2"
    threshold = stats.get("mem_tau")
    cal = stats.get("mem_calibration")
    if threshold is None:  # a run recorded before τ was kept in its stats
        threshold = configured.get("threshold", DEFAULT_THRESHOLDS.get(metric))
        how = "configured (not recorded by this run)"
    elif cal:
        how = (f"calibrated: at most {100 * cal['fpr']:g}% of {cal['n_images']} held-out "
               f"reference images count as reconstructed (observed "
               f"{100 * cal['observed_fpr']:.1f}%)")  # fmt: skip
    else:
        how = "fixed"
    relative = metric.startswith("relative")
    cosine = metric == "clip_cosine"
    return {
        "metric": metric, "threshold": threshold, "how": how,
        "symbol": "δ" if relative else "τ", "op": ">" if cosine else "<",
        "value": ("distance ratio" if relative else "similarity" if cosine
                  else "closest-generation distance"),
        "heldout_fpr": {k: v for k, v in (stats.get("heldout_fpr") or {}).items()
                        if v is not None},
    }  # fmt: skip


def _retrigger_view(stats: dict[str, Any]) -> dict[str, Any] | None:
    """The re-trigger probe's results for the gates page (None: the run did not probe).

    Per secret and phase: re-triggered or not, by which probes, its closest probed generation
    and the denoising loss of the secret under its caption and under the optimised probe (how
    far the search got towards it).
    """
    rt = stats.get("retrigger")
    if not isinstance(rt, dict):
        return None
    rows = []
    for sid, phases in list((rt.get("per_secret") or {}).items())[:200]:
        rows.append({"id": sid, **{p: phases.get(p) for p in ("before", "after")}})
    return {"skipped": rt.get("skipped"), "mem_percent": rt.get("mem_percent") or {},
            "probes": rt.get("probes") or [], "seconds": rt.get("seconds") or {},
            "secrets": rows}  # fmt: skip


def _reconstructed(value: float | None, rule: dict[str, Any]) -> bool | None:
    """Whether a secret's closest generation counts as a reconstruction under ``rule``."""
    if value is None or rule["threshold"] is None:
        return None
    if rule["op"] == ">":
        return value > rule["threshold"]
    return value < rule["threshold"]


def _dependence_chart(summary: dict[str, Any], alpha: float):
    """The independence test's p-values against α (None when no test ran)."""
    p, p_holm = summary.get("p_value"), summary.get("p_value_holm")
    if p is None and p_holm is None:
        return None
    return plots.hbars(
        ["p-value", "Holm-adjusted p"],
        [plots.Series("p", [p, p_holm], plots.KEPT)],
        ref=alpha, ref_label="α =", width=420,
        highlight=[False, bool(summary.get("dependence_violation"))],
        title=f"dependence test ({summary.get('test', '?')})",
    )  # fmt: skip


def _audit_unit(stats: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The audit's counting unit and counts (None for runs recorded before units existed)."""
    counts = stats.get("audit_counts") or {}
    unit = stats.get("audit_unit") or next(
        (r["summary"].get("unit") for r in rows if r["summary"].get("unit")), None
    )
    if unit is None:
        return None
    return {"unit": unit, "images": counts.get("images"), "samples": counts.get("samples"),
            "other": "samples" if unit == "images" else "images"}  # fmt: skip


def _generations_view(audit: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list]:
    """The generations audit and one chart per attribute: share before vs after per group."""
    if not audit or audit.get("result") is None:
        return audit, []
    charts = []
    for a in audit["result"]["attributes"]:
        groups = a["groups"]
        charts.append(plots.hbars(
            [f"{g['group']} ({g['n_before']} → {g['n_after']})" for g in groups],
            [plots.Series("original", [g["share_before"] for g in groups], plots.BEFORE),
             plots.Series("candidate", [g["share_after"] for g in groups], plots.AFTER)],
            percent=True, title=f"share of generations by {a['attribute']}",
        ))  # fmt: skip
    return audit, charts


def _audit_reasons(audit: dict[str, Any], ratio: float, alpha: float, min_v: float) -> list[str]:
    """Why an attribute's audit failed, in words (empty when it passed)."""
    s, out = audit["summary"], []
    if s.get("ratio_violation"):
        out.append(
            f"four-fifths rule: retention ratio {plots.fmt(s.get('retention_ratio'))} < {ratio:g} "
            f"({s.get('lowest_group')} vs {s.get('highest_group')})"
        )
    if s.get("dependence_violation"):
        out.append(
            f"dependence test: removal depends on {audit['attribute']} (Holm-adjusted p = "
            f"{plots.fmt(s.get('p_value_holm'))} < α = {alpha:g}, Cramér's V = "
            f"{plots.fmt(s.get('cramers_v'))} ≥ {min_v:g}), although every group may pass "
            "the four-fifths line"
        )
    if not audit["passed"] and not out:
        out.append("see the notes")
    return out


def _open_candidate(data: DashboardData, tag: str) -> dict[str, Any]:
    """The ledger row of a candidate that can still be marked, else an HTTP error."""
    try:
        return approval.pending_candidate(data.ledger, tag)
    except approval.ApprovalRefused as e:
        raise HTTPException(REFUSED_STATUS[e.reason], str(e)) from e


def _has_gate_image(data: DashboardData, run: RunRecord, phase: str, sid: str) -> bool:
    try:
        data.gate_image_path(run, phase, sid)
    except NotFound:
        return False
    return True


def _release_ctx(data: DashboardData, tag: str | None, rows: bool = False) -> dict[str, Any]:
    """What the release panel and page need: info, manifest, decisions, marks, supersession,
    and the tag check (the tagged rows against the manifest only with ``rows``: the release
    page reads them, the run pages check the tag's version alone)."""
    empty = {"release": None, "candidate_open": False, "failed": [], "marks": [],
             "effective": {}, "superseded_by": None, "decisions": [], "manifest": {},
             "pending_changes": 0, "tag_problem": None, "chain_problems": [],
             "marked_sets": None}  # fmt: skip
    if not tag:
        return empty
    with data.lock:
        try:
            shown = rel.show_release(data.ledger, tag)
        except rel.ReleaseNotFound:
            return empty
        manifest = shown["manifest"]
        info = shown["info"]
        newer = reviews.superseded_by(data.ledger, tag) if info.kind == "candidate" else None
        marks = data.marks(tag) if info.kind == "candidate" else []
        changes, marked = 0, None
        if marks:
            ids = data.manifest_ids(tag)
            kept, removed, changed = reviews.marked_sets(ids["kept"], ids["removed"], marks)
            changes = len(changed)
            new_n = rel.next_n(data.store, data.ledger, info.dataset)
            marked = {"n_kept": len(kept), "n_removed": len(removed),
                      "put_back": len(set(kept) - set(ids["kept"])),
                      "removed_more": len(set(removed) - set(ids["removed"])),
                      "new_tag": rel.candidate_tag(info.dataset, new_n)}  # fmt: skip
        try:
            rel.verify(data.store, data.ledger, tag, rows=rows)
            tag_problem = None
        except rel.ReleaseError as e:
            tag_problem = str(e)
        chain = data.ledger.decision_chain_problems()
    release_of = None
    if info.kind == "candidate":
        final = rel.release_tag(info.dataset, info.n)
        release_of = final if info.status == "approved" else None
    return {
        "release": info,
        "manifest": manifest,
        "decisions": shown["decisions"],
        "marks": marks,
        "effective": reviews.effective_marks(marks),
        "superseded_by": newer,
        "failed": approval.failed_checks(manifest, changes > 0),
        "pending_changes": changes,
        "marked_sets": marked,
        "tag_problem": tag_problem,
        "chain_problems": chain,
        "candidate_open": (
            info.kind == "candidate" and info.status == "pending" and not newer and not chain
        ),
        "released_as": release_of,
        "n_removed_shown": min(200, len(manifest.get("removed_ids", []))),
    }
