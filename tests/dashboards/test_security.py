"""Auth, roles, CSRF and input validation of every route of the review app, and the ledger
trail of every action. State-changing routes are enumerated from the app's route table, so a
new one without its guard fails here."""

from __future__ import annotations

import hashlib

import duckdb
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from dashboards.conftest import csrf_of, fresh_candidate, login
from diffcurate.dashboards.app import check_policies, create_app
from diffcurate.dashboards.security import PUBLIC, route_role
from diffcurate.storage import reviews
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import manifest_ids
from diffcurate.storage.users import ROLES

SAFE = {"GET", "HEAD"}


@pytest.fixture(scope="module")
def app(synthetic_run):
    return create_app(synthetic_run[0])


@pytest.fixture(scope="module")
def clients(app, synthetic_tokens):
    """A logged-in TestClient per role, with its session's CSRF token."""
    out = {}
    for role, token in synthetic_tokens.items():
        client = TestClient(app, base_url="http://testserver")
        out[role] = (client, login(client, token))
    return out


def _ledger_rows(ws) -> dict[str, int]:
    with duckdb.connect(str(ws / "ledger.duckdb"), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("decisions", "releases", "review_marks", "users")}  # fmt: skip


def _state_changing(app: FastAPI) -> list[APIRoute]:
    return [r for r in app.routes if isinstance(r, APIRoute) and r.methods - SAFE]


def _fill(path: str, values: dict[str, str]) -> str:
    for name in [p.strip("{}") for p in path.split("/") if p.startswith("{")]:
        name = name.split("}")[0]
        assert name in values, f"add an example value for path parameter {name!r} ({path})"
        path = path.replace("{" + name + "}", values[name])
    return path


def test_every_state_changing_route_refuses_anonymous_wrong_role_and_missing_csrf(
    app, clients, synthetic_run
):
    ws, info = synthetic_run
    tag = fresh_candidate(ws, info["tag"]).tag
    values = {"tag": tag, "sample_id": info["removed"][0]}
    routes = _state_changing(app)
    assert {r.path for r in routes} >= {"/login", "/logout", "/releases/{tag}/approve",
                                        "/releases/{tag}/reject",
                                        "/releases/{tag}/samples/{sample_id}/mark"}  # fmt: skip
    reviews.marks(Ledger(ws / "ledger.duckdb"))  # create the marks table before counting
    before = _ledger_rows(ws)
    body = {"comment": "c", "override_reason": "r", "mark": "keep", "token": "x"}
    for route in routes:
        role = route_role(route)
        assert role is not None, f"{route.path} has no Policy"
        url = _fill(route.path, values)
        for method in route.methods - SAFE:
            if role == PUBLIC:  # the login form: CSRF (double-submit cookie) still required
                anon = TestClient(app)
                r = anon.request(method, url, data=body, follow_redirects=False)
                assert r.status_code == 403, (url, r.status_code)
                continue
            anon = TestClient(app)
            r = anon.request(method, url, data={**body, "csrf_token": "x"},
                             follow_redirects=False)  # fmt: skip
            assert r.status_code == 401, (url, "anonymous", r.status_code)
            for lower in ROLES[: ROLES.index(role)]:
                client, csrf = clients[lower]
                r = client.request(method, url, data={**body, "csrf_token": csrf},
                                   follow_redirects=False)  # fmt: skip
                assert r.status_code == 403, (url, lower, r.status_code)
            client, csrf = clients[role]
            r = client.request(method, url, data=body, follow_redirects=False)
            assert r.status_code == 403, (url, "no csrf", r.status_code)
            other = clients["approver" if role != "approver" else "reviewer"][1]
            r = client.request(method, url, data={**body, "csrf_token": other},
                               follow_redirects=False)  # fmt: skip
            assert r.status_code == 403, (url, "another session's csrf", r.status_code)
            r = client.request(method, url, data={**body, "csrf_token": csrf},
                               headers={"origin": "http://evil.example"},
                               follow_redirects=False)  # fmt: skip
            assert r.status_code == 403, (url, "cross-origin", r.status_code)
    assert _ledger_rows(ws) == before  # nothing refused left a trace


def test_a_route_without_policy_is_refused_when_the_app_is_built(synthetic_run):
    app = create_app(synthetic_run[0])

    @app.post("/releases/{tag}/sneaky")
    def sneaky(tag: str) -> dict:
        return {}

    with pytest.raises(RuntimeError, match="sneaky"):
        check_policies(app)


def test_anonymous_pages_redirect_to_login(app, synthetic_run):
    _ws, info = synthetic_run
    anon = TestClient(app)
    for url in ["/", "/runs", f"/runs/{info['run_id']}", f"/runs/{info['run_id']}/audit",
                f"/runs/{info['run_id']}/gates", "/releases", f"/releases/{info['tag']}",
                f"/releases/{info['tag']}/manifest.json", f"/thumbs/{info['removed'][0]}.png",
                f"/runs/{info['run_id']}/gate/before/{info['removed'][0]}.png"]:  # fmt: skip
        r = anon.get(url, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), url
    for route in app.routes:  # every page needs a session (the guard is a dependency)
        if isinstance(route, APIRoute) and route.path not in ("/login", "/static/dashboard.css",
                                                              "/healthz"):  # fmt: skip
            calls = {getattr(d.call, "__name__", "") for d in route.dependant.dependencies}
            assert calls & {"viewer", "check"}, route.path


@pytest.mark.parametrize(
    "url",
    [
        "/runs/..%2F..%2Fetc%2Fpasswd",
        "/runs/hygiene-20260101T000000-0000000g",
        "/runs/hygiene-x'%20OR%201=1--",
        "/runs/%2e%2e/ledger.duckdb",
        "/thumbs/..%2F..%2Fledger.duckdb.png",
        "/thumbs/ABCDEF0123456789abcdef01.png",
        "/thumbs/0123456789abcdef01234567%00.png",
        "/releases/digits-candidate-1'--",
        "/releases/..%2Fdigits-candidate-1",
        "/releases/digits-candidate-0",
        "/releases/digits-candidate-1%0aSet-Cookie:x=y/manifest.json",
        "/runs/{run}/gate/before/..%2F..%2F..%2Fledger.png",
        "/runs/{run}/gate/..%2Fbefore/{sid}.png",
        "/runs/{run}/gate/during/{sid}.png",
        "/runs/{run}/gate/before/{other}.png",
        "/runs/{run}?page=-1",
        "/runs/{run}?page=1e9",
    ],
)
def test_path_and_id_injection_is_refused(clients, synthetic_run, url):
    _ws, info = synthetic_run
    client, _ = clients["viewer"]
    url = url.format(run=info["run_id"], sid=info["removed"][0], other=info["kept"][0])
    r = client.get(url, follow_redirects=False)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"root:" not in r.content and b"DUCK" not in r.content
    assert "x=y" not in r.headers.get("set-cookie", "")


def test_injection_in_actions_is_refused_and_leaves_no_trace(clients, synthetic_run):
    ws, info = synthetic_run
    tag = fresh_candidate(ws, info["tag"]).tag
    reviewer, rcsrf = clients["reviewer"]
    approver, acsrf = clients["approver"]
    before = _ledger_rows(ws)
    cases = [
        (reviewer, f"/releases/{tag}/samples/{'0' * 24}/mark", {"mark": "keep"}, rcsrf, 404),
        (reviewer, f"/releases/{tag}/samples/{info['removed'][0]}/mark", {"mark": "drop"},
         rcsrf, 400),
        (reviewer, f"/releases/{tag}/samples/{info['kept'][0]}/mark", {"mark": "remove"},
         rcsrf, 409),  # not flagged: marks are limited to flagged samples
        (reviewer, f"/releases/{tag}/samples/{info['removed'][0]}/mark",
         {"mark": "keep", "next": "//evil.example/x"}, rcsrf, 303),
        (approver, "/releases/digits-candidate-999/approve", {"comment": "x"}, acsrf, 404),
        (approver, f"/releases/{tag.replace('candidate', 'release')}/reject", {"comment": "x"},
         acsrf, 404),
        (approver, f"/releases/{tag}/approve", {"comment": ""}, acsrf, 400),
        (approver, f"/releases/{tag}/approve", {"comment": "ok"}, acsrf, 409),  # failed gates
        (approver, f"/releases/{tag}/reject", {"comment": "   "}, acsrf, 400),
    ]  # fmt: skip
    for client, url, data, csrf, status in cases:
        r = client.post(url, data={**data, "csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == status, (url, data, r.status_code, r.text[:300])
        if status == 303:
            assert r.headers["location"].startswith(f"/releases/{tag}?done=marked")
    after = _ledger_rows(ws)
    assert after == {**before, "review_marks": before["review_marks"] + 1}  # only the good mark


def test_every_action_appears_exactly_once_in_the_ledger(clients, synthetic_run):
    ws, info = synthetic_run
    ledger = Ledger(ws / "ledger.duckdb")
    tag = fresh_candidate(ws, info["tag"]).tag
    reviewer, rcsrf = clients["reviewer"]
    approver, acsrf = clients["approver"]
    flagged = info["removed"][:2]

    def mark(sid: str, choice: str, client=reviewer, csrf=rcsrf) -> None:
        r = client.post(f"/releases/{tag}/samples/{sid}/mark",
                        data={"mark": choice, "csrf_token": csrf, "comment": "looked"},
                        follow_redirects=False)  # fmt: skip
        assert r.status_code == 303, r.text

    mark(flagged[0], "keep")
    mark(flagged[0], "keep")  # a double submit records nothing new
    mark(flagged[1], "keep")
    mark(flagged[1], "remove")  # changed their mind: both marks stay, the latest counts
    rows = reviews.marks(ledger, tag)
    assert [(m["sample_id"], m["mark"], m["actor"], m["role"]) for m in rows] == [
        (flagged[0], "keep", "reviewer", "reviewer"),
        (flagged[1], "keep", "reviewer", "reviewer"),
        (flagged[1], "remove", "reviewer", "reviewer"),
    ]
    assert all(m["comment"] == "looked" and m["created_at"] for m in rows)

    data = {"comment": "fine for v2", "override_reason": "FD noise", "csrf_token": acsrf}
    r = approver.post(f"/releases/{tag}/approve", data=data, follow_redirects=False)
    assert r.status_code == 303
    new = r.headers["location"].split("/releases/")[1].split("?")[0]
    assert new != tag
    r = approver.post(f"/releases/{tag}/approve", data=data, follow_redirects=False)
    assert r.status_code == 409  # superseded: not decided twice
    r = approver.post(f"/releases/{new}/approve", data=data, follow_redirects=False)
    assert r.status_code == 409  # already approved
    decisions = ledger.decisions(new)
    assert [(d["action"], d["actor"], d["role"]) for d in decisions] == [
        ("override", "approver", "approver"), ("approve", "approver", "approver")]  # fmt: skip
    assert all("FD noise" in d["comment"] and "fine for v2" in d["comment"] for d in decisions)
    assert ledger.decisions(tag) == []
    released = new.replace("candidate", "release")
    releases = [r for r in ledger.releases() if r["tag"] in (new, released)]
    assert sorted(r["kind"] for r in releases) == ["candidate", "release"]
    ids = manifest_ids(ledger, new)
    assert flagged[0] in ids["kept"] and flagged[1] in ids["removed"]
    manifest = ledger.release(new)["manifest"]
    assert manifest["gates_measured"] is False  # the original's gates do not cover it
    assert manifest["based_on_gates"]["gate_passed"] is False

    rejected = fresh_candidate(ws, info["tag"]).tag
    r = approver.post(f"/releases/{rejected}/reject",
                      data={"comment": "not this one", "csrf_token": acsrf},
                      follow_redirects=False)  # fmt: skip
    assert r.status_code == 303
    r = approver.post(
        f"/releases/{rejected}/reject",
        data={"comment": "again", "csrf_token": acsrf},
        follow_redirects=False,
    )
    assert r.status_code == 409
    assert [(d["action"], d["comment"]) for d in ledger.decisions(rejected)] == [
        ("reject", "not this one")]  # fmt: skip


def test_login_tokens_sessions_and_headers(app, synthetic_run, synthetic_tokens):
    ws, _ = synthetic_run
    token = synthetic_tokens["viewer"]
    with duckdb.connect(str(ws / "ledger.duckdb"), read_only=True) as con:
        stored = con.execute("SELECT token_hash FROM users WHERE name = 'viewer'").fetchone()[0]
        everything = str(con.execute("SELECT * FROM users").fetchall())
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in everything

    client = TestClient(app)
    form = client.get("/login")
    for header in ("content-security-policy", "x-frame-options", "x-content-type-options"):
        assert header in form.headers
    assert "script-src" not in form.headers["content-security-policy"]  # default-src 'none'
    r = client.post("/login", data={"csrf_token": csrf_of(form.text), "token": "dct_wrong"},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 401
    r = client.post("/login", data={"csrf_token": csrf_of(r.text), "token": token,
                                    "next": "//evil.example/"}, follow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/runs"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/runs")
    assert page.status_code == 200 and "viewer" in page.text
    r = client.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/runs", follow_redirects=False).status_code == 303  # session gone

    throttled = TestClient(app, client=("10.9.9.9", 1234))
    codes = []
    for _ in range(12):
        f = throttled.get("/login")
        codes.append(throttled.post("/login", data={"csrf_token": csrf_of(f.text),
                                                    "token": "nope"}).status_code)  # fmt: skip
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]


def test_chart_labels_are_escaped():
    from diffcurate.dashboards import plots

    svg = plots.hbars(["<script>alert(1)</script>"], [plots.Series("a&b", [0.5], plots.KEPT)],
                      title='"><img src=x>')  # fmt: skip
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "<img" not in svg
    hist = plots.histogram([1.0, 2.0, float("nan")], [False, True, False], title="<b>")
    assert "<b>" not in hist and "flagged (1)" in hist


def test_a_locked_ledger_answers_503(synthetic_run, synthetic_tokens, monkeypatch):
    app = create_app(synthetic_run[0])
    client = TestClient(app)
    login(client, synthetic_tokens["viewer"])

    def locked():
        raise duckdb.IOException("Could not set lock on file")

    monkeypatch.setattr(app.state.data, "runs", locked)
    r = client.get("/runs")
    assert r.status_code == 503 and "Ledger busy" in r.text
