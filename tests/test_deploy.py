"""Deployments: infra/prefect.yaml, the work pools, and scheduled runs on a real Prefect server.

The server tests start ``prefect server start`` on a free port in a subprocess with its own
PREFECT_HOME, apply ``infra/prefect.yaml`` through ``diffcurate deploy apply``, and serve a
hygiene deployment whose schedule must produce a run that completes with a candidate release.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from diffcurate.deployments import POOLS, deploy_env, pool_template

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
FLOWS = {
    "diffcurate.flows.ingest.ingest_flow": ("ingest", "IngestParams"),
    "diffcurate.flows.score.score_flow": ("score", "ScoreParams"),
    "diffcurate.flows.hygiene.hygiene_flow": ("hygiene", "HygieneParams"),
}


# ----------------------------------------------------------------------- files, no server
def _resolved_prefect_yaml(monkeypatch, tmp_path) -> dict:
    from prefect.utilities.templating import apply_values

    env = deploy_env(dataset="digits", model=tmp_path / "model", workspace=tmp_path / "ws",
                     cron="15 2 * * 1-5", dask_address="tcp://10.0.0.5:8786")  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    raw = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    return apply_values(raw, {}, remove_notset=False)


def test_prefect_yaml_deploys_every_flow_by_module_path(monkeypatch, tmp_path):
    import importlib

    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    config = _resolved_prefect_yaml(monkeypatch, tmp_path)
    PrefectYamlModel.model_validate(config)  # the shape `prefect deploy` accepts
    assert "{{" not in json.dumps(config), "an unresolved variable"
    assert config["pull"] == []  # code comes installed in the image: nothing to pull
    deployments = {d["entrypoint"]: d for d in config["deployments"]}
    assert deployments.keys() == FLOWS.keys()
    for entrypoint, d in deployments.items():
        assert ":" not in entrypoint  # module path, not file path
        flow_name, params_class = FLOWS[entrypoint]
        assert load_flow_from_entrypoint(entrypoint).name == flow_name
        module = importlib.import_module(entrypoint.rsplit(".", 1)[0])
        params = getattr(module, params_class).model_validate(d["parameters"]["params"])
        assert params.dataset == "digits"
        assert d["work_pool"]["name"] in POOLS
    score = deployments["diffcurate.flows.score.score_flow"]["parameters"]["params"]
    assert score["runner"] == "dask" and score["dask"]["address"] == "tcp://10.0.0.5:8786"
    hygiene = deployments["diffcurate.flows.hygiene.hygiene_flow"]
    assert hygiene["schedules"] == [{"cron": "15 2 * * 1-5", "timezone": "UTC"}]
    assert hygiene["work_pool"]["name"] == "gpu" and hygiene["concurrency_limit"] == 1


def test_work_pool_files_match_the_pools_diffcurate_creates():
    for name in POOLS:
        on_disk = json.loads((INFRA / "work-pools" / f"{name}.json").read_text())
        assert on_disk == pool_template(name), f"regenerate infra/work-pools/{name}.json"
    env = pool_template("gpu")["variables"]["properties"]["env"]
    assert env["default"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_compose_runs_workers_of_the_declared_pools_from_the_worker_image():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prefect-server", "cpu-worker", "gpu-worker", "dask-scheduler",
            "dask-gpu-worker"} <= services.keys()  # fmt: skip
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "infra/Dockerfile", name
    pools = {svc["command"].split("--pool ")[1].split()[0] for svc in services.values()
             if "worker start" in svc["command"]}  # fmt: skip
    assert pools == set(POOLS)
    for name in ("gpu-worker", "dask-gpu-worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], name
    assert services["dask-gpu-worker"]["command"].startswith("dask worker tcp://dask-scheduler")
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "torch==${TORCH_VERSION}" in dockerfile and "pip install ." in dockerfile
    assert "infra/dask.yaml /etc/dask/dask.yaml" in dockerfile
    nanny = yaml.safe_load((INFRA / "dask.yaml").read_text())["distributed"]["nanny"]
    assert nanny["pre-spawn-environ"] == {"MALLOC_TRIM_THRESHOLD_": None}


def test_deploy_commands_refuse_without_a_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from typer.testing import CliRunner

    from diffcurate.cli import app

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["deploy", "pools"])
    assert result.exit_code == 2 and "PREFECT_API_URL is not set" in result.output


# ------------------------------------------------------------------- a real Prefect server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with the children it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on a free port; yields (api_url, env for clients)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # create scheduled runs within seconds of a deployment's creation (default: 60 s)
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        client_env = {**os.environ, "PREFECT_API_URL": url,
                      "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-client"))}  # fmt: skip
        yield url, client_env
    finally:
        _stop(proc)


def _deployment(url: str, flow: str, name: str) -> dict:
    response = httpx.get(f"{url}/deployments/name/{flow}/{name}", timeout=10)
    response.raise_for_status()
    return response.json()


@pytest.mark.slow
def test_deploy_apply_creates_pools_limit_and_every_deployment(prefect_server, tmp_path):
    url, env = prefect_server
    result = subprocess.run(
        [str(BIN / "diffcurate"), "deploy", "apply", "--dataset", "digits", "--model",
         "/models/digits-8px", "-w", "/workspace", "--cron", "30 1 * * *", "--gpu-slots", "3",
         "--prefect-file", str(INFRA / "prefect.yaml")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in POOLS:
        pool = httpx.get(f"{url}/work_pools/{name}", timeout=10).json()
        assert pool["type"] == "process" and pool["base_job_template"] == pool_template(name)
    limit = httpx.get(f"{url}/concurrency_limits/tag/gpu", timeout=10).json()
    assert limit["concurrency_limit"] == 3
    hygiene = _deployment(url, "hygiene", "digits-nightly")
    assert hygiene["entrypoint"] == "diffcurate.flows.hygiene.hygiene_flow"
    assert hygiene["work_pool_name"] == "gpu"
    (schedule,) = hygiene["schedules"]
    assert schedule["schedule"]["cron"] == "30 1 * * *" and schedule["active"]
    assert hygiene["parameters"]["params"]["model"] == "/models/digits-8px"
    score = _deployment(url, "score", "digits-sharded")
    assert score["parameters"]["params"]["runner"] == "dask"
    ingest = _deployment(url, "ingest", "digits")
    assert ingest["work_pool_name"] == "cpu" and not ingest["schedules"]


@pytest.fixture(scope="module")
def hygiene_inputs(tmp_path_factory, digit_files, prefect_harness):
    """An ingested workspace (60 digits + 3 copies) and a saved tiny reference DDPM."""
    from diffcurate.models.diffusion import save_diffusion_model
    from diffcurate.models.reference import reference_model
    from workspaces import ingest_samples

    root = tmp_path_factory.mktemp("deploy-hygiene")
    ws = ingest_samples(root, digit_files)
    model_dir = save_diffusion_model(reference_model("tiny", seed=1), root / "model")
    params = root / "hygiene.json"
    params.write_text(json.dumps({
        "mitigation": {"method": "finetune", "epochs": 1, "lr": 2e-6, "batch_size": 16},
        "measure": {"generations": 24, "inference_steps": 4, "kid_subsets": 5,
                    "kid_subset_size": 10},
        "gate": {"max_mem_percent_after": 100.0},
        "audit_attributes": ["stroke", "slant"],
    }))  # fmt: skip
    return ws, model_dir, params


@pytest.mark.slow
def test_served_schedule_runs_a_hygiene_run_to_a_candidate_release(
    prefect_server, hygiene_inputs, tmp_path
):
    from diffcurate.storage.ledger import Ledger

    url, env = prefect_server
    ws, model_dir, params = hygiene_inputs
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [str(BIN / "diffcurate"), "deploy", "serve", "--dataset", "digits", "--model",
         str(model_dir), "-w", str(ws), "--scorer", "loss", "--interval", "15",
         "--name", "digits-every-15s", "--params", str(params)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        completed = None
        deployment_id = None
        while completed is None:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
            if deployment_id is None:
                r = httpx.get(f"{url}/deployments/name/hygiene/digits-every-15s", timeout=10)
                if r.status_code != 200:
                    continue
                deployment = r.json()
                deployment_id = deployment["id"]
                assert deployment["entrypoint"] == "diffcurate.flows.hygiene.hygiene_flow"
                (schedule,) = deployment["schedules"]
                assert schedule["schedule"]["interval"] == 15.0
            runs = httpx.post(f"{url}/flow_runs/filter", timeout=10, json={
                "deployments": {"id": {"any_": [deployment_id]}}}).json()  # fmt: skip
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, (tmp_path / "serve.log").read_text()[-3000:]
            done = [r for r in runs if r["state_type"] == "COMPLETED"]
            completed = done[0] if done else None
    finally:
        _stop(serve)
    assert completed["auto_scheduled"]  # created by the server's scheduler, not by hand
    ledger = Ledger(ws / "ledger.duckdb")
    done = {r.run_id: r for r in ledger.runs(kind="hygiene") if r.status == "completed"}
    release = ledger.release("digits-candidate-1")
    assert release["kind"] == "candidate"
    run = done[release["manifest"]["runs"]["hygiene"]]
    assert run.stats["n_samples"] == 63 and run.stats["release_tag"] == release["tag"]


def test_apply_refuses_a_deployments_file_with_unfilled_variables(monkeypatch, tmp_path):
    from diffcurate.deployments import load_prefect_file

    env = deploy_env(dataset="digits", model=tmp_path / "m", workspace=tmp_path / "ws")
    del env["DIFFCURATE_DASK_ADDRESS"]
    monkeypatch.delenv("DIFFCURATE_DASK_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="no value for DIFFCURATE_DASK_ADDRESS"):
        load_prefect_file(INFRA / "prefect.yaml", env)
    env["DIFFCURATE_DASK_ADDRESS"] = "tcp://h:8786"
    configs = load_prefect_file(INFRA / "prefect.yaml", env)
    assert [c.name for c in configs] == ["digits", "digits-sharded", "digits-nightly"]
    assert "DIFFCURATE_DATASET" not in os.environ  # the environment is left as it was
