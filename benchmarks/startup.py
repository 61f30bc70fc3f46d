"""Fixed start-up of the flow commands, as ratios measured side by side in one run.

For each command (``run``, ``eval``, ``score``, ``attribute``, ``train``, ``sample``) every
row is a fresh ``diffcurate`` process, timed from outside (wall clock):

* ``--help``;
* a refusal of a bad ``--model`` (``/nope``) and of an unknown dataset, with this checkout and,
  with ``--old-rev``, with the source tree of an older commit (``git archive``, put first on
  ``PYTHONPATH``): the refusal before the fast checks existed;
* with ``--old-rev``, the import of each flow module, this commit vs the old one (what lazy
  imports cut from every run's start-up);
* a minimal run of ``score`` (the ``loss`` scorer on 12 digits) and ``train`` (2 steps of the
  ``tiny`` architecture), where the work is negligible and the time is the fixed start-up:
  imports, the flow's Prefect API, ledger and tables. Once with Prefect's ephemeral server
  (started inside the command, the default), once against a running ``prefect server start``
  (``PREFECT_API_URL``).

The baseline of the refusal and help rows is ``python -c "import diffcurate"`` in the same run;
the runs are compared ephemeral vs server. Medians of ``--repeats``; nothing here asserts a
timing.

Usage::

    .venv/bin/python benchmarks/startup.py --old-rev 1926f68 --repeats 2 --old-repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("run", "eval", "score", "attribute", "train", "sample")
FLOW_MODULES = ("diffcurate.flows.hygiene", "diffcurate.flows.evaluate",
                "diffcurate.flows.score", "diffcurate.flows.train")  # fmt: skip


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PREFECT_API_URL", None)
    return env | (extra or {})


def timed(args: list[str], env: dict[str, str], expect: int | None = None) -> float:
    """Wall seconds of one process; checks its exit code when ``expect`` is given."""
    start = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if expect is not None and res.returncode != expect:
        raise RuntimeError(f"{shlex.join(args)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return seconds


def median_of(repeats: int, args: list[str], env: dict[str, str], expect: int | None) -> float:
    return statistics.median(timed(args, env, expect) for _ in range(repeats))


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "diffcurate.cli", *map(str, args)]


def refusal_args(command: str, ws: Path, model: Path, query: Path, bad: str) -> list[object]:
    """Arguments of ``command`` with a bad model (``bad="model"``) or dataset (``"dataset"``)."""
    m = Path("/nope") if bad == "model" else model
    d = "nope" if bad == "dataset" else "digits"
    wsarg = ["--workspace", ws]
    return {
        "run": ["run", "--model", m, "--dataset", d, *wsarg],
        "eval": ["eval", "--model", m, "--dataset", d, "--secrets", "a", *wsarg],
        "score": ["score", "--model", m, "--dataset", d, "--scorer", "loss", *wsarg],
        "attribute": ["attribute", query, "--model", m, *wsarg],
        "train": ["train", "--dataset", d, "--arch", "tiny", "--steps", 1, *wsarg],
        "sample": ["sample", "--model", m, "--out", ws / "grid.png", "--n", 1],
    }[command]


def prepare(root: Path) -> tuple[Path, Path, Path]:
    """A workspace with 12 ingested digits, a 2-step tiny model and a query image."""
    from diffcurate.demo.corpus import digit_samples
    from diffcurate.demo.writers import write_folder

    samples, _ = digit_samples(n_duplicated=0, copies=1)
    write_folder(samples[:12], root / "src")
    ws = root / "ws"
    env = _env()
    timed(cli("ingest", root / "src", "--dataset", "digits", "--workspace", ws), env, 0)
    timed(cli("train", "--dataset", "digits", "--arch", "tiny", "--steps", 2, "--batch-size",
              4, "--workspace", ws), env, 0)  # fmt: skip
    model = ws / "models" / "digits-tiny" / "checkpoints" / "step-00000002"
    query = root / "query.png"
    query.write_bytes(samples[0].image)
    return ws, model, query


def old_tree(rev: str, dest: Path) -> Path:
    """The ``src/`` tree of ``rev``, extracted without touching the repository's work tree."""
    data = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True,
                          check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` in the background; returns it and its API URL once healthy."""
    port = free_port()
    env = _env({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
         "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError("prefect server did not become healthy in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-rev", help="Commit whose refusal path to time as the old path.")
    parser.add_argument("--old-repeats", type=int, default=1, help="Repeats of old-path rows.")
    parser.add_argument("--commands", default=",".join(COMMANDS))
    a = parser.parse_args()
    commands = [c for c in a.commands.split(",") if c]
    tmp = Path(tempfile.mkdtemp(prefix="diffcurate-startup-"))
    ws, model, query = prepare(tmp)
    env = _env()
    old_env = None
    if a.old_rev:
        old_src = old_tree(a.old_rev, tmp / "old")
        old_env = env | {"PYTHONPATH": str(old_src)}
    r = a.repeats
    base = median_of(r, [sys.executable, "-c", "import diffcurate"], env, 0)
    rows = []
    for c in commands:
        row = {"command": c, "help": median_of(r, cli(c, "--help"), env, 0)}
        for bad in ("model", "dataset"):
            if (c, bad) in (("sample", "dataset"), ("attribute", "dataset"), ("train", "model")):
                continue  # no such argument
            args = cli(*refusal_args(c, ws, model, query, bad))
            row[f"refuse_{bad}"] = median_of(r, args, env, 2)
            if old_env is not None:
                row[f"old_{bad}"] = median_of(a.old_repeats, args, old_env, None)
        rows.append(row)
    imports: dict[str, tuple[float, float]] = {}
    if old_env is not None:  # the flow modules' imports: what every run's start-up pays
        for module in FLOW_MODULES:
            args = [sys.executable, "-c", f"import {module}"]
            new, old = [], []
            for _ in range(a.old_repeats):  # alternated, so load drifts hit both alike
                new.append(timed(args, env, 0))
                old.append(timed(args, old_env, 0))
            imports[module] = (statistics.median(new), statistics.median(old))

    runs = {
        "score": cli("score", "--model", model, "--dataset", "digits", "--scorer", "loss",
                     "--no-resume", "--workspace", ws),
        "train": cli("train", "--dataset", "digits", "--arch", "tiny", "--steps", 2,
                     "--batch-size", 4, "--name", "startup", "--workspace", ws),
    }  # fmt: skip
    first_step: dict[str, dict[str, float]] = {k: {} for k in runs}
    server, url = start_server(tmp / "prefect-server")
    try:
        for k in range(r):  # alternate the two modes so load drifts hit both alike
            for name, args in runs.items():
                for mode, extra in (("ephemeral", {}), ("server", {"PREFECT_API_URL": url})):
                    if name == "train":  # a new model each time: a full run, not a resume
                        args = [*args[:-3], f"startup-{k}-{mode}", *args[-2:]]
                    first_step[name].setdefault(mode, [])
                    first_step[name][mode].append(timed(args, env | extra, 0))
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"# Fixed start-up of the flow commands ({platform.node()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f} at the end)\n")  # fmt: skip
    print(f"command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`; medians of {r}; "
          f"baseline `python -c \"import diffcurate\"` = {base:.2f} s\n")  # fmt: skip
    head = "| command | --help / import | bad --model / import | unknown dataset / import |"
    sep = "|---|---|---|---|"
    if old_env is not None:
        head += " old bad --model / new | old unknown dataset / new |"
        sep += "---|---|"
    print(head + "\n" + sep)
    for row in rows:
        cells = [row["command"], f"{row['help'] / base:.1f}x"]
        cells.append(
            f"{row['refuse_model'] / base:.1f}x ({row['refuse_model']:.2f} s)"
            if "refuse_model" in row else "-"
        )  # fmt: skip
        cells.append(
            f"{row['refuse_dataset'] / base:.1f}x ({row['refuse_dataset']:.2f} s)"
            if "refuse_dataset" in row else "-"
        )  # fmt: skip
        if old_env is not None:
            cells.append(
                f"{row['old_model'] / row['refuse_model']:.1f}x" if "old_model" in row else "-"
            )
            cells.append(
                f"{row['old_dataset'] / row['refuse_dataset']:.1f}x" if "old_dataset" in row
                else "-"
            )  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if imports:
        print("\n| import | this commit / import diffcurate | old / this commit |\n|---|---|---|")
        for module, (new, old) in imports.items():
            print(f"| `{module}` | {new / base:.0f}x ({new:.1f} s) | {old / new:.2f}x |")
    print("\n| minimal run | ephemeral Prefect / import | running server / import | "
          "ephemeral / server |\n|---|---|---|---|")  # fmt: skip
    for name, modes in first_step.items():
        e, s = statistics.median(modes["ephemeral"]), statistics.median(modes["server"])
        print(f"| {name} | {e / base:.0f}x ({e:.1f} s) | {s / base:.0f}x ({s:.1f} s) | "
              f"{e / s:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
