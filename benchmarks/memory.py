"""Peak memory of a hygiene run at two corpus sizes: does it grow with the corpus?

The script builds two seeded corpora of RGB images (default 2,000 and 20,000 at 64x64, where
the decoded corpus is 20,000 x 3 x 64 x 64 float32 = 983 MB), ingests each into its own
workspace, saves one small pixel-space UNet, and runs the whole hygiene flow (cheap ``random``
scorer, a short fine-tune, a few generations) in a fresh child process per (size, path). Each
child reports its own peak resident set size (``VmHWM`` in ``/proc/self/status``), so the
Prefect server and the parent are not counted.

Two paths, side by side in one run:

* streamed (what ``hygiene_flow`` does): the fine-tune reads each keyed batch from LanceDB;
* in-memory (the old path, kept here only as the baseline): every kept image is decoded into
  one tensor first (``load_inputs``), swapped in for ``training_rows`` in the child.

The table prints each path's peak RSS ratio ``large / small``. Nothing here asserts a number;
the issue's bar is a streamed ratio <= 1.2.

Usage::

    .venv/bin/python benchmarks/memory.py                       # 2,000 vs 20,000 at 64x64
    .venv/bin/python benchmarks/memory.py --sizes 500 2000 --image-size 32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET = "bench"
PATHS = ("streamed", "in-memory")


def configure_prefect(home: Path) -> None:
    """A private Prefect home with its ephemeral server, set before prefect is imported."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def smooth_images(n: int, size: int, seed: int) -> list[bytes]:
    """``n`` distinct PNG images: seeded 8x8 colour fields upsampled to ``size`` (compressible,
    like photos, so the stored corpus stays small while the decoded one is full size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_workspace(root: Path, n: int, size: int, seed: int) -> Path:
    """Ingest ``n`` images (with a ``shade`` attribute to audit) into ``root/ws``."""
    from diffcurate.config import ClipSettings, IngestSettings
    from diffcurate.demo.writers import SampleFile, write_manifest
    from diffcurate.flows.ingest import IngestParams, ingest_flow

    blobs = smooth_images(n, size, seed)
    samples = [
        SampleFile(key=f"img{i:06d}", image=b, ext="png", caption=f"image {i}",
                   metadata={"shade": ("dark", "light")[i % 2]})
        for i, b in enumerate(blobs)
    ]  # fmt: skip
    manifest = write_manifest(samples, root / "corpus.parquet")
    ws = root / "ws"
    ingest_flow(IngestParams(source=manifest, dataset=DATASET, workspace=ws, clip=ClipSettings(),
                             ingest=IngestSettings(), progress=False))  # fmt: skip
    return ws


def save_model(out: Path, size: int) -> Path:
    """A small RGB pixel-space UNet at ``size`` (random weights: memory does not care)."""
    from diffcurate.models.diffusion import DiffusionModel, save_diffusion_model
    from diffcurate.models.reference import UNetArchitecture
    from diffcurate.models.schedule import SchedulerConfig

    arch = UNetArchitecture(
        name="bench-rgb", sample_size=size, in_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    model = DiffusionModel(unet=arch.build(0), scheduler=SchedulerConfig().build())
    return save_diffusion_model(model, out)


def child(args: argparse.Namespace) -> None:
    """Run one hygiene flow and print its summary line and this process's peak RSS as JSON."""
    configure_prefect(Path(args.prefect_home))
    from diffcurate.curation.gate import GatePolicy
    from diffcurate.curation.generations import GenerationsAuditConfig
    from diffcurate.curation.measure import MeasureConfig
    from diffcurate.flows import hygiene
    from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
    from diffcurate.influence.registry import ScorerSpec
    from diffcurate.mitigation import MitigationConfig

    if args.path == "in-memory":
        from diffcurate.models.inputs import load_inputs
        from diffcurate.models.training_data import TensorData

        def in_memory(store, dataset, model, ids, geometry):  # type: ignore[no-untyped-def]
            prepared = load_inputs(store, dataset, model, ids, geometry=geometry)
            rows = TensorData(prepared.x0)
            rows.geometry = prepared.geometry  # type: ignore[attr-defined]
            return rows

        hygiene.training_rows = in_memory  # type: ignore[assignment]

    started = time.perf_counter()
    summary = hygiene_flow(
        HygieneParams(
            dataset=DATASET, model=Path(args.model), workspace=Path(args.workspace),
            scorer=ScorerSpec(signal="random"),
            mitigation=MitigationConfig(steps=args.steps, batch_size=args.batch_size),
            measure=MeasureConfig(generations=args.generations, inference_steps=2,
                                  kid_subsets=2, kid_subset_size=args.generations),
            generations_audit=GenerationsAuditConfig(enabled=False),
            gate=GatePolicy(max_mem_percent_after=100.0), audit_attributes=["shade"],
            progress=False,
        )
    )  # fmt: skip
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - started,
                      "n_kept": summary.n_kept, "stages": summary.stage_seconds}))  # fmt: skip


def run_child(args: argparse.Namespace, ws: Path, model: Path, path: str, home: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", path, "--workspace", str(ws),
           "--model", str(model), "--prefect-home", str(home), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size),
           "--generations", str(args.generations)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"- platform: {platform.platform()}\n- cpu count: {os.cpu_count()}\n"
            f"- python: {platform.python_version()}, torch: {torch.__version__} "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n"
            f"- load average at start (1/5/15 min): {load}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="fine-tune steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prefect-home", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    small, large = args.sizes
    command = " ".join(["benchmarks/memory.py", *map(shlex.quote, sys.argv[1:])])
    print(f"# hygiene-run peak memory\n\ncommand: `.venv/bin/python {command}`\n")
    print(f"machine:\n{machine()}\n")
    decoded = large * 3 * args.image_size**2 * 4 / 2**20
    print(f"corpora: {small:,} and {large:,} seeded RGB {args.image_size}x{args.image_size} PNGs "
          f"(decoded float32 corpus at {large:,}: {decoded:,.0f} MiB); random scorer, "
          f"fine-tune {args.steps} steps x {args.batch_size}, {args.generations} generations "
          "per model, generations audit off\n")  # fmt: skip
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="diffcurate-bench-memory-") as tmp:
        root = Path(tmp)
        configure_prefect(root / "prefect-home")
        model = save_model(root / "model", args.image_size)
        for n in (small, large):
            t0 = time.perf_counter()
            ws = build_workspace(root / f"n{n}", n, args.image_size, args.seed)
            print(f"built and ingested {n:,} images in {time.perf_counter() - t0:.1f} s",
                  flush=True)  # fmt: skip
            for path in args.paths:
                results[n, path] = run_child(args, ws, model, path, root / "prefect-home")
                r = results[n, path]
                print(f"  {path}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s",
                      flush=True)  # fmt: skip
    print("\n## Results\n")
    print(f"| path | peak RSS at {small:,} (MiB) | peak RSS at {large:,} (MiB) "
          f"| ratio {large:,} / {small:,} | mitigate stage at {small:,} (s) "
          f"| mitigate stage at {large:,} (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for path in args.paths:
        a, b = results[small, path], results[large, path]
        ra, rb = a["peak_rss_mib"], b["peak_rss_mib"]
        print(f"| {path} | {ra:,.0f} | {rb:,.0f} | {rb / ra:.3f} "
              f"| {a['stages']['mitigate']:.1f} | {b['stages']['mitigate']:.1f} |")  # fmt: skip
    if set(args.paths) == set(PATHS):
        for n in (small, large):
            s, m = results[n, "streamed"], results[n, "in-memory"]
            print(f"\nat {n:,}: streamed / in-memory peak RSS = "
                  f"{s['peak_rss_mib'] / m['peak_rss_mib']:.3f}, mitigate stage time = "
                  f"{s['stages']['mitigate'] / m['stages']['mitigate']:.3f}")  # fmt: skip
    for key, r in results.items():
        print(f"\nstage seconds ({key[1]}, {key[0]:,}): {r['stages']}")


if __name__ == "__main__":
    main()
