"""Training steps/s under a background load: the hygiene flow's in-flow retrain vs standalone
``diffcurate train``, at one torch thread and at the default (unset: the CPUs this process may
use), side by side in one run.

Both train the same architecture (``digits-8px``) for the same steps at the same batch size on
the same ingested digits, each in a fresh ``diffcurate`` process:

* standalone: ``diffcurate train --steps N`` (steps/s = N / the train flow's seconds, which
  include reading the dataset);
* in-flow: ``diffcurate run --mitigation retrain --retrain-steps N`` with the cheapest other
  stages (``random`` scorer, few gate generations); steps/s = N / the run's ``mitigate`` stage
  seconds (model load, reading the kept samples, training, saving), from the ledger.

While they run, ``--load`` busy processes (pure-Python spin loops) compete for the cores, as
other jobs on a shared machine do. Threads ``1`` passes ``--threads 1``; ``unset`` passes
nothing and removes ``OMP_NUM_THREADS`` from the environment. Configurations alternate over
``--repeats``; medians. Nothing here asserts a timing.

Usage::

    .venv/bin/python benchmarks/threads.py --steps 300 --load 2 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "diffcurate.cli", *map(str, args)]


def run_cli(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> None:
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode not in ok:
        raise RuntimeError(f"{shlex.join(args)} exited {res.returncode}:\n{res.stderr[-3000:]}")


def env_for(threads: str) -> tuple[dict[str, str], list[str]]:
    """The environment and extra CLI flags of a threads setting (``1`` or ``unset``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DIFFCURATE_THREADS")}  # fmt: skip
    return env, ([] if threads == "unset" else ["--threads", threads])


def latest_stats(ws: Path, kind: str) -> dict:
    from diffcurate.storage.ledger import Ledger

    return Ledger(ws / "ledger.duckdb").runs(kind=kind)[0].stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=300, help="Digits ingested.")
    parser.add_argument("--load", type=int, default=2, help="Busy background processes.")
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()

    from diffcurate.config import available_cpus
    from diffcurate.demo.corpus import digit_samples
    from diffcurate.demo.writers import write_folder

    tmp = Path(tempfile.mkdtemp(prefix="diffcurate-threads-"))
    samples, _ = digit_samples(n_duplicated=0, copies=1)
    write_folder(samples[: a.images], tmp / "src")
    ws = tmp / "ws"
    env1, _ = env_for("1")
    env1["OMP_NUM_THREADS"] = "1"
    run_cli(cli("ingest", tmp / "src", "--dataset", "digits", "--workspace", ws), env1)
    run_cli(cli("train", "--dataset", "digits", "--steps", 10, "--name", "base",
                "--workspace", ws), env1)  # fmt: skip
    base = ws / "models" / "base" / "checkpoints" / "step-00000010"

    results: dict[tuple[str, str], list[float]] = {}
    load = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(a.load)]
    try:
        for k in range(a.repeats):
            for threads in ("1", "unset"):
                env, flags = env_for(threads)
                run_cli(cli("train", "--dataset", "digits", "--steps", a.steps, "--batch-size",
                            a.batch_size, "--name", f"t{k}-{threads}", "--workspace", ws,
                            *flags), env)  # fmt: skip
                seconds = latest_stats(ws, "train")["seconds"]
                results.setdefault(("standalone train", threads), []).append(a.steps / seconds)
                run_cli(cli("run", "--dataset", "digits", "--model", base, "--scorer", "random",
                            "--mitigation", "retrain", "--retrain-steps", a.steps,
                            "--mitigation-option", f"batch_size={a.batch_size}",
                            "--generations", 16, "--inference-steps", 10,
                            "--audit-generations", 0, "--no-retrigger", "--max-mem", 100,
                            "--workspace", ws, *flags), env, ok=(0, 1))  # fmt: skip
                seconds = latest_stats(ws, "hygiene")["stage_seconds"]["mitigate"]
                results.setdefault(("in-flow retrain", threads), []).append(a.steps / seconds)
    finally:
        for p in load:
            p.kill()
            p.wait()

    med = {key: statistics.median(v) for key, v in results.items()}
    ref = med[("standalone train", "1")]
    print(f"# Training steps/s under {a.load} busy background processes ({platform.node()}, "
          f"{available_cpus()} CPUs this process may use, load {os.getloadavg()[0]:.2f} at "
          "the end)\n")  # fmt: skip
    print(f"command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`; digits-8px, "
          f"{a.steps} steps at batch {a.batch_size} on {a.images} digits; medians of "
          f"{a.repeats}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")  # fmt: skip
    print("| path | threads | steps/s | vs standalone train, threads 1 |\n|---|---|---|---|")
    for (path, threads), v in sorted(med.items()):
        label = "1" if threads == "1" else f"unset (= {available_cpus()})"
        print(f"| {path} | {label} | {v:.1f} | {v / ref:.2f}x |")
    for path in ("standalone train", "in-flow retrain"):
        print(f"\n{path}: threads 1 / unset = "
              f"{med[(path, '1')] / med[(path, 'unset')]:.2f}x")  # fmt: skip
    unset = med[("in-flow retrain", "unset")] / med[("standalone train", "unset")]
    print(f"in-flow / standalone at threads 1 = {med[('in-flow retrain', '1')] / ref:.2f}x; "
          f"at unset = {unset:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
