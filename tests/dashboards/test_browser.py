"""The review dashboard driven in Debian's headless chromium (Playwright): log in, review a
flagged image, approve the release; screenshots of the main pages go to tests/artifacts/."""

from __future__ import annotations

import json

import pytest

from diffcurate.storage import reviews
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import manifest_ids


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    yield context.new_page()
    context.close()


def _login(page, url: str, token: str) -> None:
    page.goto(f"{url}/runs")
    assert "/login" in page.url  # anonymous: sent to the login form
    page.fill("#token", token)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(f"{url}/runs")


def _logout(page) -> None:
    page.click("form[action='/logout'] button")
    page.wait_for_url("**/login")


def _images_loaded(page) -> bool:
    page.wait_for_load_state("load")
    return page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


def test_review_a_flagged_image_and_approve_the_release(
    page, real_run, real_server, real_tokens, artifacts
):
    ws, summary = real_run
    url, run_url = real_server.url, f"{real_server.url}/runs/{summary.run_id}"
    page.goto(f"{url}/login")
    page.screenshot(path=str(artifacts / "login.png"))

    # A reviewer keeps the riskiest flagged image.
    _login(page, url, real_tokens["reviewer"])
    assert summary.run_id in page.inner_text("table")
    page.screenshot(path=str(artifacts / "runs.png"), full_page=True)
    page.click(f"a[href='/runs/{summary.run_id}']")
    tiles = page.locator("article.tile")
    assert tiles.count() == summary.n_flagged_images
    first = tiles.first
    sample_id = first.get_attribute("id").removeprefix("s-")
    assert "score" in first.inner_text() and "copies" in first.inner_text()
    assert first.locator(".nn:not(.gen) img").count() == 3  # nearest training neighbours
    # Flagged images are the gate's secrets here: their closest generations sit beside them.
    assert first.locator(".nn.gen img").count() == 2
    assert _images_loaded(page)
    first.locator("button.keep").click()
    page.wait_for_url(f"{run_url}?page=1#s-{sample_id}")
    tile = page.locator(f"#s-{sample_id}")
    assert "keep" in tile.locator(".status").inner_text()
    assert "by reviewer" in tile.locator(".status").inner_text()
    page.screenshot(path=str(artifacts / "run_flagged.png"), full_page=True)
    for name in ("audit", "gates"):
        page.click(f"nav.tabs a[href='/runs/{summary.run_id}/{name}']")
        assert _images_loaded(page)
        page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    # Gates: each secret's training image beside its closest generations, before and after.
    assert page.locator("table.secrets tbody tr, table.secrets tr").count() >= len(summary.secrets)
    assert page.locator(f"img[src$='/gate/before/{summary.secrets[0]}.png']").count() == 1
    assert page.locator(f"img[src$='/gate/after/{summary.secrets[0]}.png']").count() == 1
    # A reviewer cannot decide.
    page.goto(f"{url}/releases/{summary.release_tag}")
    assert page.locator("#approve-form").count() == 0
    _logout(page)

    # The approver approves; the reviewer's mark is applied as a new candidate first.
    _login(page, url, real_tokens["approver"])
    page.goto(f"{url}/releases/{summary.release_tag}")
    assert "reviewer mark" in page.inner_text(".decide")
    page.screenshot(path=str(artifacts / "release_pending.png"), full_page=True)
    page.fill("#approve-comment", "reviewed in the dashboard")
    if page.locator("#override-reason").count():
        page.fill("#override-reason", "gate noise on a 63-image corpus")
    page.click("#approve-form button[type=submit]")
    page.wait_for_url("**/releases/digits-candidate-*?done=approved")
    new_tag = page.url.split("/releases/")[1].split("?")[0]
    assert new_tag != summary.release_tag
    assert "approved" in page.inner_text("h1")
    assert "reviewed in the dashboard" in page.inner_text("table.grid-table")
    page.screenshot(path=str(artifacts / "release_approved.png"), full_page=True)

    ledger = Ledger(ws / "ledger.duckdb")
    manifest = ledger.release(new_tag)["manifest"]
    assert manifest["based_on"] == summary.release_tag
    assert [o["sample_id"] for o in manifest["overrides"]] == [sample_id]
    ids = manifest_ids(ledger, new_tag)
    assert sample_id in ids["kept"] and sample_id not in ids["removed"]
    approvals = [d for d in ledger.decisions(new_tag) if d["action"] == "approve"]
    assert len(approvals) == 1 and approvals[0]["actor"] == "approver"
    assert ledger.release(new_tag.replace("candidate", "release"))["kind"] == "release"
    assert len(reviews.marks(ledger, summary.release_tag)) == 1
    # The original candidate is superseded: no more decisions on it.
    page.goto(f"{url}/releases/{summary.release_tag}")
    assert "Superseded by" in page.inner_text("main")
    assert page.locator("#approve-form").count() == 0


def test_grid_of_1000_flagged_images_loads_fast(
    page, synthetic_run, synthetic_server, synthetic_tokens, artifacts
):
    _ws, info = synthetic_run
    url = synthetic_server.url
    _login(page, url, synthetic_tokens["viewer"])
    timings = {}
    for label, query in (("page 1 (cold)", ""), ("page 1 (warm)", ""), ("page 11", "?page=11"),
                         ("last page", "?page=21")):  # fmt: skip
        page.goto(f"{url}/runs/{info['run_id']}{query}")
        nav = page.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return {load: n.loadEventEnd - n.startTime, ttfb: n.responseStart - n.startTime}"
            " })()"
        )
        timings[label] = {k: round(v, 1) for k, v in nav.items()}
        assert _images_loaded(page)
        if label == "page 1 (cold)":
            page.screenshot(path=str(artifacts / "grid_1000.png"), full_page=False)
    assert "1000 images" in page.inner_text("h2")
    assert page.locator("nav.pager").first.inner_text().count("page 21 of 21") == 1
    assert page.locator("article.tile").count() == 1000 - 20 * 48
    page.goto(f"{url}/runs/{info['run_id']}")
    assert page.locator("article.tile").count() == 48
    assert page.locator("article.tile .rank").first.inner_text().startswith("#1 ")
    (artifacts / "grid_1000_timings.json").write_text(json.dumps(timings, indent=2))
    print("\n1,000 flagged images, 48 per page; browser navigation timings (ms):", timings)
    assert all(t["load"] < 15_000 for t in timings.values()), timings


def test_failed_gates_need_an_override_reason(
    page, synthetic_run, synthetic_server, synthetic_tokens, artifacts
):
    from dashboards.conftest import fresh_candidate

    ws, info = synthetic_run
    tag = fresh_candidate(ws, info["tag"]).tag
    url = synthetic_server.url
    _login(page, url, synthetic_tokens["approver"])
    page.goto(f"{url}/releases/{tag}")
    assert "failed its gates" in page.inner_text(".decide")
    page.fill("#approve-comment", "FD within noise")
    page.click("#approve-form button[type=submit]")  # the browser refuses: reason required
    assert page.url.endswith(f"/releases/{tag}")
    assert page.evaluate("document.querySelector('#override-reason').validity.valueMissing")
    page.fill("#override-reason", "FD +16% on 3 secrets is sampling noise; accepted")
    page.screenshot(path=str(artifacts / "release_override.png"), full_page=True)
    page.click("#approve-form button[type=submit]")
    page.wait_for_url(f"**/releases/{tag}?done=approved")
    actions = [d["action"] for d in Ledger(ws / "ledger.duckdb").decisions(tag)]
    assert actions == ["override", "approve"]
    assert "sampling noise" in page.inner_text("table.grid-table")
