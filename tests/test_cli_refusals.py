"""Fast refusals: a bad model, dataset or workspace is one line, exit 2, within seconds, before
torch or Prefect is imported.

The commands run as real subprocesses (a fresh interpreter pays the imports a user pays); the
5-second bound is the issue's acceptance criterion, measured on the command as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pyarrow as pa
import pytest
import typer

from diffcurate.cli.checks import check_datasets, check_model
from diffcurate.config import load_settings
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.schemas import SAMPLES
from diffcurate.workspace import Workspace
from workspaces import save_tiny_unet_model

LIMIT_S = 5.0
# A dataset refusal opens the Lance table (one import, one row count) on top of a model's.
DATASET_LIMIT_S = 10.0
MISSING_MODEL = "model not found"


def _samples_table(workspace, dataset: str, n: int) -> None:
    """``n`` rows of ``dataset`` in the samples table: what the checks count (written directly,
    without the ingest flow, to keep this module fast)."""
    now = datetime.now(UTC)
    rows = [
        {"sample_id": f"s{i}", "dataset": dataset, "key": f"k{i}", "source": "test",
         "image": b"", "image_format": "png", "width": 8, "height": 8, "sha256": str(i),
         "phash": "0", "caption": "", "metadata": "{}", "embedding_model": None,
         "image_embedding": None, "text_embedding": None, "ingest_run_id": "r",
         "ingested_at": now}
        for i in range(n)
    ]  # fmt: skip
    LanceStore(Workspace(workspace).lancedb_uri).insert_new(
        "samples", pa.Table.from_pylist(rows, schema=SAMPLES)
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    workspace = root / "ws"
    _samples_table(workspace, "digits", 3)
    model = save_tiny_unet_model(root / "model")
    query = root / "query.png"
    query.write_bytes(b"not read before the model check")
    return {"workspace": workspace, "model": model, "query": query, "root": root}


def _cli(*args) -> tuple[int, str, float]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "diffcurate.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    return res.returncode, res.stdout + res.stderr, time.perf_counter() - start


def _assert_refused(args, message: str, limit_s: float = LIMIT_S) -> None:
    code, output, seconds = _cli(*args)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert message in lines[0] and "Traceback" not in output
    assert seconds < limit_s, f"{args[0]} refused after {seconds:.1f} s"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--dataset", "digits"],
        ["eval", "--dataset", "digits", "--secrets", "a,b"],
        ["score", "--dataset", "digits", "--scorer", "loss"],
        ["attribute", "{query}"],
        ["sample", "--out", "{root}/grid.png"],
    ],
)
def test_a_bad_model_is_refused_within_seconds(ws, command):
    args = [a.format(**ws) for a in command] + ["--model", ws["root"] / "nope"]
    if command[0] != "sample":
        args += ["--workspace", ws["workspace"]]
    _assert_refused(args, f"{MISSING_MODEL}: {ws['root'] / 'nope'}")


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--model", "{model}"],
        ["eval", "--model", "{model}", "--secrets", "a"],
        ["score", "--model", "{model}"],
        ["train"],
    ],
)
def test_an_unknown_dataset_is_refused_within_seconds(ws, command):
    args = [a.format(**ws) for a in command]
    args += ["--dataset", "digitz", "--workspace", ws["workspace"]]
    _assert_refused(args, "unknown dataset 'digitz'", DATASET_LIMIT_S)


def test_an_unknown_heldout_dataset_is_refused(ws):
    args = ["run", "--model", ws["model"], "--dataset", "digits", "--heldout-dataset", "real"]
    _assert_refused(
        [*args, "--workspace", ws["workspace"]], "unknown dataset 'real'", DATASET_LIMIT_S
    )


def test_a_missing_workspace_is_refused_and_not_created(ws):
    missing = ws["root"] / "no-such-ws"
    args = ["run", "--model", ws["model"], "--dataset", "digits", "--workspace", missing]
    _assert_refused(args, f"workspace {missing} does not exist")
    assert not missing.exists()


def test_refusals_happen_before_torch_and_prefect_are_imported(ws):
    """In-process: after the refusal, neither torch nor Prefect nor diffusers is loaded."""
    code = (
        "import json, sys\n"
        "from diffcurate.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "heavy = [m for m in ('torch', 'prefect', 'diffusers') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    for args in (
        ["run", "--model", ws["root"] / "nope", "--dataset", "digits"],
        ["run", "--model", ws["model"], "--dataset", "digitz"],
        ["train", "--dataset", "digitz"],
    ):
        res = subprocess.run(
            [sys.executable, "-c", code, *map(str, args), "--workspace", str(ws["workspace"])],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rc": 2, "heavy": []}


def test_valid_arguments_pass_the_fast_checks(ws):
    """The checks refuse nothing valid: a saved model, an ingested dataset, an existing
    workspace (the same calls the commands make, in-process)."""
    settings = load_settings(ws["workspace"])
    check_model(ws["model"])
    check_datasets(settings, "digits", None)
    with pytest.raises(typer.Exit):
        check_datasets(settings, "digits", "digitz")
