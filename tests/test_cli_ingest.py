"""``diffcurate ingest --workers / --runner``: options reach the flow, bad values are refused."""

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.demo.writers import write_folder
from diffcurate.storage.lance_store import LanceStore

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.usefixtures("prefect_harness")
def test_workers_option_decodes_in_worker_processes(tmp_path, digit_files):
    write_folder(digit_files[:12], tmp_path / "src")
    ws = tmp_path / "ws"
    res = invoke("ingest", tmp_path / "src", "-d", "d", "-w", ws, "--workers", 2)
    assert res.exit_code == 0, res.output
    assert "decoded by" in res.output and "2 local worker(s)" in res.output
    assert LanceStore(str(ws / "lancedb")).count("samples", "d") == 12


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--workers", 0, "workers"), ("--runner", "spark", "runner")],
)
def test_bad_workers_or_runner_is_refused_with_exit_2(tmp_path, digit_files, option, value,
                                                      message):  # fmt: skip
    write_folder(digit_files[:2], tmp_path / "src")
    res = invoke("ingest", tmp_path / "src", "-d", "d", "-w", tmp_path / "ws", option, value)
    assert res.exit_code == 2 and message in res.output
