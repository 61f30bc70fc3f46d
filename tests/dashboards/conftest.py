"""Fixtures of the dashboard tests: one real hygiene run and one synthetic run with 1,000
flagged images (both session-scoped), users of each role, live servers and a headless chromium."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import (
    RESERVED_KEYS,
    ReleaseInfo,
    create_candidate,
    manifest_ids,
)
from diffcurate.storage.users import ROLES, UserStore

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """``tests/artifacts/`` (screenshots, timings); ignored by git through its own .gitignore."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    return ARTIFACTS


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, digit_files, prefect_harness):
    """A real hygiene run on 63 ingested digits with a saved tiny DDPM (about 20 s)."""
    from diffcurate.curation.gate import GatePolicy
    from diffcurate.curation.measure import MeasureConfig
    from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
    from diffcurate.influence.registry import ScorerSpec
    from diffcurate.mitigation import MitigationConfig
    from diffcurate.models.diffusion import save_diffusion_model
    from diffcurate.models.reference import reference_model
    from workspaces import ingest_samples

    root = tmp_path_factory.mktemp("dash-real")
    ws = ingest_samples(root, digit_files)
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), root / "model")
    params = HygieneParams(
        dataset="digits", model=model_dir, workspace=ws, scorer=ScorerSpec(signal="loss"),
        mitigation=MitigationConfig(method="finetune", epochs=1, lr=2e-6, batch_size=16),
        measure=MeasureConfig(generations=24, inference_steps=4, kid_subsets=5,
                              kid_subset_size=10),
        gate=GatePolicy(max_mem_percent_after=100.0), audit_attributes=["stroke", "slant"],
        flag={"fraction": 0.1}, progress=False,
    )  # fmt: skip
    summary = hygiene_flow(params)
    return ws, summary


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """1,200 real digit images, 1,000 of them flagged, written through the storage layer."""
    from dashboards.synthetic import build_synthetic

    ws = tmp_path_factory.mktemp("dash-synthetic") / "ws"
    return ws, build_synthetic(ws, "digits", n_samples=1200, n_flagged=1000)


def add_users(ws: Path) -> dict[str, str]:
    """One user per role (named after it); returns role -> token."""
    store = UserStore(ws / "ledger.duckdb")
    existing = {u["name"] for u in store.list()}
    return {r: store.add(r, r) for r in ROLES if r not in existing}


@pytest.fixture(scope="session")
def real_tokens(real_run) -> dict[str, str]:
    return add_users(real_run[0])


@pytest.fixture(scope="session")
def synthetic_tokens(synthetic_run) -> dict[str, str]:
    return add_users(synthetic_run[0])


def fresh_candidate(ws: Path, tag: str) -> ReleaseInfo:
    """A new pending candidate with the same sets and provenance as ``tag``."""
    store, ledger = LanceStore(str(ws / "lancedb")), Ledger(ws / "ledger.duckdb")
    ids = manifest_ids(ledger, tag)
    own = RESERVED_KEYS | {"based_on", "overrides", "candidate", "approved_by",
                           "approval_comment", "override"}  # fmt: skip
    manifest = {k: v for k, v in ledger.release(tag)["manifest"].items() if k not in own}
    return create_candidate(store, ledger, ledger.release(tag)["dataset"], ids["kept"],
                            ids["removed"], manifest=manifest, created_by="tests")  # fmt: skip


class LiveServer:
    """The app served by uvicorn on a free local port, in a daemon thread."""

    def __init__(self, ws: Path) -> None:
        import uvicorn

        from diffcurate.dashboards.app import create_app

        self.app = create_app(ws)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def real_server(real_run):
    server = LiveServer(real_run[0])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def synthetic_server(synthetic_run):
    server = LiveServer(synthetic_run[0])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client, token: str) -> str:
    """Log a TestClient in; returns the session's CSRF token."""
    page = client.get("/login")
    r = client.post("/login", data={"csrf_token": csrf_of(page.text), "token": token},
                    follow_redirects=False)  # fmt: skip
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/runs").text)
