"""Tables on an S3-compatible server against tables on local disk, side by side in one run.

The same corpus (real scikit-learn digits, nothing downloaded) is ingested and scored into two
fresh workspaces per repeat: one with its tables in ``WORKSPACE/lancedb``, one with
``tables.uri = s3://...`` on moto's S3 server, started here as a separate process on a local
port. Rows: the ingest flow, the score flow (per-sample loss on a tiny saved UNet) and a full
scan of ``samples`` (image bytes included). Repeats alternate the two backends so that load
changes on a shared machine hit both.

The S3 side pays HTTP and moto's own Python request handling on the same cores, with no network
latency: the ratios say what the object-store code path costs here, not what a real bucket
over a network costs. Nothing here asserts a timing.

Usage::

    .venv/bin/python benchmarks/object_store.py                 # 600 digits, 3 repeats
    .venv/bin/python benchmarks/object_store.py --n-images 1797 --repeats 5
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
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

BUCKET = "diffcurate-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    """moto's S3 server as a child process; returns once it answers HTTP."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's server did not start within 60 s")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="diffcurate-bench-s3-"))
    os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.update(CREDENTIALS)

    import boto3
    import lancedb
    import torch

    from diffcurate.config import ClipSettings, IngestSettings
    from diffcurate.demo.corpus import digit_samples
    from diffcurate.demo.writers import write_manifest
    from diffcurate.flows.ingest import IngestParams, ingest_flow
    from diffcurate.flows.score import ScoreParams, score_flow
    from diffcurate.influence.registry import ScorerSpec
    from diffcurate.models.diffusion import save_diffusion_model
    from diffcurate.models.reference import reference_model
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.workspace import Workspace

    port = free_port()
    moto = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint": endpoint, "region": "us-east-1", "allow_http": "true"}
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        samples, _ = digit_samples(n_duplicated=0, copies=1)
        samples = samples[: args.n_images]
        manifest = tmp / "digits.parquet"
        write_manifest(samples, manifest)
        model_dir = save_diffusion_model(reference_model("tiny", seed=1), tmp / "model")
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())

        def run(ws: Path) -> dict[str, float]:
            ingest = IngestParams(source=manifest, dataset="digits", workspace=ws,
                                  clip=ClipSettings(), ingest=IngestSettings(),
                                  progress=False)  # fmt: skip
            score = ScoreParams(dataset="digits", model=model_dir, workspace=ws,
                                scorer=ScorerSpec(signal="loss"), progress=False)  # fmt: skip
            store = LanceStore.open(Workspace(ws))
            return {
                "ingest flow": timed(lambda: ingest_flow(ingest)),
                "score flow (loss)": timed(lambda: score_flow(score)),
                "full scan of samples": timed(lambda: store.read("samples")),
            }

        run(tmp / "warm-up")  # Prefect's ephemeral server and imports, charged to no row
        seconds: dict[str, dict[str, list[float]]] = {"local": {}, "s3": {}}
        for r in range(args.repeats):
            for backend in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                ws = tmp / f"{backend}-{r}"
                if backend == "s3":
                    Workspace(ws, f"s3://{BUCKET}/r{r}", options).bind_tables()
                for row, s in run(ws).items():
                    seconds[backend].setdefault(row, []).append(s)
                assert (ws / "lancedb").exists() == (backend == "local")
    finally:
        moto.terminate()
        moto.wait(timeout=30)

    command = shlex.join([".venv/bin/python", "benchmarks/object_store.py", *(argv or [])])
    print("# diffcurate tables on object storage: moto's S3 server vs local disk\n")
    print(f"command: `{command}`\n")
    print(f"- platform: {platform.platform()}, cpu count: {os.cpu_count()}")
    print(f"- torch: {torch.__version__} (threads: {torch.get_num_threads()}), "
          f"lancedb: {lancedb.__version__}")  # fmt: skip
    print(f"- load average at start (1/5/15 min): {load}")
    print(f"- corpus: {len(samples)} sklearn digits; {args.repeats} repeats, backends "
          "alternating; medians\n")  # fmt: skip
    print("| step | local disk (s) | moto S3 (s) | S3 / local |")
    print("|---|---:|---:|---:|")
    for row in seconds["local"]:
        local = statistics.median(seconds["local"][row])
        s3 = statistics.median(seconds["s3"][row])
        print(f"| {row} | {local:.2f} | {s3:.2f} | {s3 / local:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
