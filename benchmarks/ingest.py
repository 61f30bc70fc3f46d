"""Ingest throughput benchmark, reported as ratios to raw image decoding measured in one run.

The script builds a seeded corpus of real images (scikit-learn's handwritten digits, upsampled,
and random crops of the photographs bundled with scikit-image; nothing is downloaded), writes it
as WebDataset tar shards, then measures on that one corpus, side by side:

* raw decode: ``PIL.Image.open(...).load()`` + ``convert("RGB")`` over the in-memory image
  bytes (the baseline every other row is divided by);
* ``decode_image``: diffcurate's decode + SHA-256 + pHash step alone;
* the full Prefect ``ingest_flow`` without embeddings, timed from outside (wall clock,
  including Prefect orchestration) and from inside (``IngestSummary.seconds``);
* the same flow with CLIP embeddings from a tiny stand-in open_clip model built here with
  random weights (a lower bound on the cost of a real ViT-B-32), and optionally a real model
  (``--clip-model`` / ``--clip-checkpoint``).

Absolute seconds depend on the machine; only the ratios, measured in one run on one corpus,
are meant to be compared. Nothing here asserts a timing.

With ``--sizes`` (and ``--workers``) it measures scaling instead: per image size, the ingest
flow at each worker count against the decode+hash bound, i.e. ``decode_image``'s single-process
throughput measured in the same run times the worker count. Sizes above 64 px are JPEG crops
of the bundled photographs only (realistic training images); 64 px keeps the mixed corpus.

Usage::

    .venv/bin/python benchmarks/ingest.py                 # defaults: 5,000 images, 64x64
    .venv/bin/python benchmarks/ingest.py --sizes 64,256 --workers 1,2 --n-images 2000
    .venv/bin/python benchmarks/ingest.py --n-images 20000 --repeats 3
    .venv/bin/python benchmarks/ingest.py --clip-model ViT-B-32 --clip-checkpoint vit_b_32.pt
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from diffcurate.config import ClipSettings
    from diffcurate.demo.writers import SampleFile
    from diffcurate.flows.ingest import IngestSummary

DATASET = "bench"
TINY_CLIP_NAME = "diffcurate-bench-tiny-clip"
TINY_CLIP_ARCH: dict[str, object] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# Images shipped inside the scikit-image wheel (skimage/data/*.png|jpg): they load with no
# network access. Images that scikit-image fetches with pooch are deliberately not listed.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WARMUP_IMAGES = 20


@dataclass(frozen=True)
class Corpus:
    """The benchmark corpus: encoded samples and how they were made."""

    samples: list[SampleFile]
    n_digits: int
    n_crops: int
    photos: list[str]
    skipped_photos: list[str]


@dataclass(frozen=True)
class Measurement:
    """One row of the result table.

    Attributes:
        configuration: What was timed.
        images: Images processed (for flows: samples ingested).
        seconds: Median wall-clock seconds over the repeats.
        note: Anything unexpected about the run (quarantined rows, ...); empty when clean.
    """

    configuration: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Environment


def configure_prefect(home: Path) -> None:
    """Point Prefect at a throwaway home and quiet it; must run before Prefect is imported.

    Args:
        home: Empty directory for Prefect's ephemeral-server database and profiles.

    Raises:
        RuntimeError: If ``prefect`` was already imported (its settings would be stale).
    """
    if "prefect" in sys.modules:
        raise RuntimeError("prefect was imported before its environment was configured")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    # An API URL or profile inherited from the shell would send runs to a real server.
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.pop("PREFECT_PROFILE", None)


def machine_description() -> list[str]:
    """Lines describing the machine and the library versions that matter for the numbers."""
    import lancedb
    import open_clip
    import PIL
    import prefect
    import torch

    cpus = f"- cpu count: {os.cpu_count()}"
    if hasattr(os, "sched_getaffinity"):
        cpus += f" (usable by this process: {len(os.sched_getaffinity(0))})"
    lines = [
        f"- platform: {platform.platform()} ({platform.machine()})",
        cpus,
        f"- python: {platform.python_version()} ({platform.python_implementation()})",
        f"- torch: {torch.__version__} (intra-op threads: {torch.get_num_threads()}, "
        f"cuda available: {torch.cuda.is_available()})",
        f"- pillow: {PIL.__version__}, prefect: {prefect.__version__}, "
        f"lancedb: {lancedb.__version__}, open_clip: {open_clip.__version__}",
    ]
    if hasattr(os, "getloadavg"):
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        lines.append(f"- load average at start (1/5/15 min): {load}")
    return lines


# --------------------------------------------------------------------------------------------
# Corpus


def _encode(img: Image.Image, fmt: Literal["JPEG", "PNG"]) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _load_photos() -> tuple[dict[str, Image.Image], list[str]]:
    """Load the bundled scikit-image photos as 8-bit L/RGB images; returns (photos, skipped)."""
    from skimage import data

    photos: dict[str, Image.Image] = {}
    skipped: list[str] = []
    for name in SKIMAGE_PHOTOS:
        try:
            array = np.asarray(getattr(data, name)())
        except Exception as err:  # a missing optional file must not sink the benchmark
            skipped.append(f"{name} ({type(err).__name__})")
            continue
        if array.dtype != np.uint8:
            skipped.append(f"{name} (dtype {array.dtype})")
            continue
        img = Image.fromarray(array)
        photos[name] = img.convert("RGB") if img.mode not in ("L", "RGB") else img
    return photos, skipped


def build_corpus(n_images: int, size: int, seed: int, with_digits: bool = True) -> Corpus:
    """Build ``n_images`` distinct real images (distinct bytes), shuffled with ``seed``.

    Up to half the corpus is scikit-learn digits upsampled to ``size`` x ``size`` (grayscale
    PNG); the rest are random crops (random side, position and flip) of the bundled
    scikit-image photographs, resized to ``size`` x ``size`` and saved as JPEG.

    Args:
        n_images: Number of samples.
        size: Side of every image, in pixels.
        seed: Seed for crops, shuffling and order.
        with_digits: Include the digits (False: photo crops only).

    Returns:
        The corpus, in memory.
    """
    from sklearn.datasets import load_digits

    from diffcurate.demo.writers import SampleFile

    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    items: list[tuple[bytes, str, str, dict[str, object]]] = []

    def add(data: bytes, ext: str, caption: str, meta: dict[str, object]) -> bool:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            return False
        seen.add(digest)
        items.append((data, ext, caption, meta))
        return True

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    n_digits = 0
    for index in rng.permutation(len(pixels)):
        if n_digits >= n_images // 2 or not with_digits:
            break
        img = Image.fromarray(pixels[index]).resize((size, size), Image.Resampling.BICUBIC)
        word = DIGIT_WORDS[int(digits.target[index])]
        meta: dict[str, object] = {"collection": "sklearn-digits", "index": int(index)}
        n_digits += add(_encode(img, "PNG"), "png", f"a handwritten digit {word}", meta)

    photos, skipped = _load_photos()
    if not photos:
        raise RuntimeError(f"no scikit-image photo could be loaded: {skipped}")
    names = sorted(photos)
    n_crops = 0
    attempts = 0
    while len(items) < n_images:
        attempts += 1
        if attempts > 20 * n_images:
            raise RuntimeError("could not generate enough distinct crops; lower --n-images")
        name = names[int(rng.integers(len(names)))]
        photo = photos[name]
        width, height = photo.size
        side = int(rng.integers(min(size, width, height), min(width, height) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        crop = crop.resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        meta = {"collection": "skimage-data", "photo": name, "box": [left, top, side]}
        n_crops += add(_encode(crop, "JPEG"), "jpg", f"a photo crop of {name}", meta)

    order = rng.permutation(len(items))
    samples = [
        SampleFile(key=f"{k:07d}", image=data, ext=ext, caption=caption, metadata=meta)
        for k, (data, ext, caption, meta) in enumerate(items[i] for i in order)
    ]
    return Corpus(
        samples=samples,
        n_digits=n_digits,
        n_crops=n_crops,
        photos=names,
        skipped_photos=skipped,
    )


def write_shards(corpus: Corpus, out: Path) -> Path:
    """Write the corpus as WebDataset ``.tar`` shards under ``out`` (created); returns ``out``."""
    from diffcurate.demo.writers import write_webdataset

    write_webdataset(corpus.samples, out)
    return out


# --------------------------------------------------------------------------------------------
# CLIP


def build_tiny_clip(out_dir: Path, seed: int, device: str, batch_size: int) -> ClipSettings:
    """Write a tiny randomly initialised open_clip model to disk, as the tests do.

    Args:
        out_dir: Where the architecture JSON and the checkpoint go.
        seed: Torch seed for the random weights.
        device: ``ClipSettings.device``.
        batch_size: ``ClipSettings.batch_size``.

    Returns:
        Settings that make ``ClipEmbedder`` load it through open_clip's local-file path.
    """
    import open_clip
    import torch

    from diffcurate.config import ClipSettings

    out_dir.mkdir(parents=True, exist_ok=True)
    arch = out_dir / f"{TINY_CLIP_NAME}.json"
    arch.write_text(json.dumps(TINY_CLIP_ARCH, indent=2))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_NAME)
    checkpoint = out_dir / f"{TINY_CLIP_NAME}.pt"
    torch.save(model.state_dict(), checkpoint)
    return ClipSettings.model_validate(
        {
            "model": TINY_CLIP_NAME,
            "checkpoint": checkpoint,
            "architecture_file": arch,
            "device": device,
            "batch_size": batch_size,
        }
    )


# --------------------------------------------------------------------------------------------
# Measurements


def time_raw_decode(images: Sequence[bytes]) -> float:
    """Baseline: seconds to PIL-open, fully load and convert to RGB every in-memory image."""
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img.convert("RGB")
    return time.perf_counter() - start


def time_decode_image(images: Sequence[bytes]) -> tuple[float, int]:
    """diffcurate's per-image step alone (decode, SHA-256, pHash); returns (seconds, failures)."""
    from diffcurate.config import IngestSettings
    from diffcurate.ingest.decode import DecodeFailure, decode_image

    max_pixels = IngestSettings().max_pixels
    start = time.perf_counter()
    failures = sum(
        isinstance(decode_image(data, max_pixels=max_pixels), DecodeFailure) for data in images
    )
    return time.perf_counter() - start, failures


def run_flow(
    source: Path,
    workspace: Path,
    clip: ClipSettings,
    batch_size: int,
    *,
    fresh: bool = True,
    workers: int = 1,
    dask_address: str | None = None,
) -> tuple[float, IngestSummary]:
    """Run ``ingest_flow`` into a workspace; returns (wall seconds, summary).

    Args:
        source: WebDataset shard directory.
        workspace: A directory that must not exist yet (nothing is "already present").
        clip: Embedding settings (checkpoint unset: no embeddings).
        batch_size: ``IngestSettings.batch_size``: records per shard/commit.
        fresh: Require a new workspace (False: re-ingest into an existing one).
        workers: Decoding processes (``IngestParams.workers``).
        dask_address: Decode on this Dask scheduler instead (``runner="dask"``).

    Raises:
        FileExistsError: If ``fresh`` and ``workspace`` exists.
    """
    from diffcurate.config import IngestSettings
    from diffcurate.flows.ingest import IngestParams, ingest_flow
    from diffcurate.flows.sharded import DaskOptions

    if fresh and workspace.exists():
        raise FileExistsError(f"benchmark workspace is not fresh: {workspace}")
    params = IngestParams(
        source=source,
        dataset=DATASET,
        workspace=workspace,
        clip=clip,
        ingest=IngestSettings(batch_size=batch_size),
        progress=False,
        workers=workers,
        runner="local" if dask_address is None else "dask",
        dask=DaskOptions(address=dask_address),
    )
    start = time.perf_counter()
    summary = ingest_flow(params)
    return time.perf_counter() - start, summary


def check_summary(summary: IngestSummary, expected: int, embeddings: bool) -> str:
    """Describe what is off about a benchmark flow run; empty when all samples went in."""
    problems = []
    if summary.ingested != expected:
        problems.append(f"ingested {summary.ingested} of {expected}")
    if summary.already_present:
        problems.append(f"{summary.already_present} already present")
    if summary.quarantined:
        problems.append(f"quarantined {summary.quarantined_by_reason}")
    if embeddings == (summary.embeddings == "disabled"):
        problems.append(f"embeddings: {summary.embeddings}")
    return "; ".join(problems)


@dataclass
class FlowConfig:
    """One ingest-flow configuration and what its runs measured."""

    label: str
    clip: ClipSettings
    walls: list[float] = field(default_factory=list)
    insides: list[float] = field(default_factory=list)
    summaries: list[IngestSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def run(self, shards: Path, expected: int, workspace: Path, batch_size: int) -> None:
        """Ingest ``shards`` once into the fresh ``workspace`` and record the timings."""
        wall, summary = run_flow(shards, workspace, self.clip, batch_size)
        self.walls.append(wall)
        self.insides.append(summary.seconds)
        self.summaries.append(summary)
        if note := check_summary(summary, expected, self.clip.enabled):
            self.notes.append(f"run {len(self.summaries)}: {note}")

    def measurements(self) -> list[Measurement]:
        """Two rows: wall clock around the flow call, and ``summary.seconds`` inside it."""
        images = min(s.ingested for s in self.summaries)
        note = " | ".join(self.notes)
        return [
            Measurement(
                f"{self.label}: wall clock (incl. Prefect orchestration)",
                images,
                statistics.median(self.walls),
                note,
            ),
            Measurement(
                f"{self.label}: inside the flow (`summary.seconds`)",
                images,
                statistics.median(self.insides),
                note,
            ),
        ]


# --------------------------------------------------------------------------------------------
# Report


def markdown_table(rows: Sequence[Measurement], baseline: Measurement) -> str:
    """The result table; the ratio is each row's images/s divided by the baseline's."""
    lines = [
        "| configuration | images | seconds | images/s | ratio to raw decode |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row.rate / baseline.rate
        lines.append(
            f"| {row.configuration} | {row.images:,} | {row.seconds:.2f} | {row.rate:,.0f} "
            f"| {ratio:.3f} |"
        )
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/ingest.py",
        description=(
            "Measure diffcurate ingest throughput as RATIOS to raw PIL decoding, all measured "
            "side by side in one run on one seeded corpus of real images (scikit-learn digits "
            "and crops of scikit-image's bundled photos, written as WebDataset shards). Rows: "
            "raw decode (baseline), decode_image (decode + hashes), the Prefect ingest flow "
            "without embeddings, and with embeddings from a TINY randomly initialised open_clip "
            "stand-in (a lower bound on real CLIP cost; pass --clip-model/--clip-checkpoint to "
            "add a row with real weights). Each flow run uses a fresh workspace. Absolute "
            "seconds are machine-specific; compare ratios."
        ),
        epilog=(
            "Prints a markdown table (configuration | images | seconds | images/s | ratio to "
            "raw decode), the machine and the command line. Exit status 1 when a flow run did "
            "not ingest every image (the table then says why)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-images", type=int, default=5000, help="corpus size")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=None,
        help="scaling mode: comma-separated image sides, e.g. 64,256 (replaces --size)",
    )
    parser.add_argument(
        "--workers",
        type=_int_list,
        default=[1, 2],
        help="scaling mode: comma-separated decoding process counts",
    )
    parser.add_argument(
        "--dask-workers",
        type=int,
        default=0,
        help="scaling mode: also run the flow with --runner dask on a local cluster of this "
        "many worker processes (started once, not charged; 0: no Dask rows)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the corpus and tiny CLIP")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="ingest shard size (IngestSettings.batch_size)"
    )
    parser.add_argument(
        "--clip-batch-size", type=int, default=64, help="embedding batch (ClipSettings.batch_size)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="CLIP device"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the median is reported"
    )
    parser.add_argument(
        "--no-tiny-clip", action="store_true", help="skip the tiny stand-in CLIP configuration"
    )
    parser.add_argument(
        "--clip-model", default=None, help="real open_clip architecture name, e.g. ViT-B-32"
    )
    parser.add_argument(
        "--clip-checkpoint", type=Path, default=None, help="local checkpoint for --clip-model"
    )
    parser.add_argument(
        "--clip-architecture-file",
        type=Path,
        default=None,
        help="JSON config for --clip-model when open_clip does not know the architecture",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep corpus, tiny model and workspaces under this (new or empty) directory",
    )
    args = parser.parse_args(argv)
    if (args.clip_model is None) != (args.clip_checkpoint is None):
        parser.error("--clip-model and --clip-checkpoint go together")
    if args.n_images < 2 or args.size < 8 or args.repeats < 1:
        parser.error("need --n-images >= 2, --size >= 8 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; returns the exit status."""
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffcurate-bench-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp) if args.keep is None else args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
        configure_prefect(Path(tmp) / "prefect-home")
        if args.sizes is not None:
            return _run_scaling(args, root, started)
        return _run(args, root, started)


def _run(args: argparse.Namespace, root: Path, started: float) -> int:
    from diffcurate.config import ClipSettings

    print("# diffcurate ingest benchmark\n")
    print(f"command: `{shlex.join(sys.orig_argv)}`\n")
    print("machine:")
    for line in machine_description():
        print(line)
    print("", flush=True)

    t0 = time.perf_counter()
    corpus = build_corpus(args.n_images, args.size, args.seed)
    shards = write_shards(corpus, root / "corpus" / "shards")
    images = [s.image for s in corpus.samples]
    nbytes = sum(len(b) for b in images)
    print(
        f"corpus: {len(images):,} distinct real {args.size}x{args.size} images "
        f"({corpus.n_digits:,} sklearn digits as PNG, {corpus.n_crops:,} random crops of "
        f"{len(corpus.photos)} bundled scikit-image photos as JPEG; {nbytes / 2**20:.1f} MiB "
        f"encoded), seed {args.seed}, {len(list(shards.glob('*.tar')))} WebDataset "
        f"shards; built in {time.perf_counter() - t0:.1f} s"
    )
    if corpus.skipped_photos:
        print(f"skipped scikit-image images: {', '.join(corpus.skipped_photos)}")

    clip_dir = root / "clip"
    tiny = None
    if not args.no_tiny_clip:
        tiny = build_tiny_clip(clip_dir, args.seed, args.device, args.clip_batch_size)
    real = None
    if args.clip_model is not None:
        real = ClipSettings.model_validate(
            {
                "model": args.clip_model,
                "checkpoint": args.clip_checkpoint,
                "architecture_file": args.clip_architecture_file,
                "device": args.device,
                "batch_size": args.clip_batch_size,
            }
        )

    # Warm-up: the first flow call starts Prefect's ephemeral API server (seconds). A tiny
    # corpus, run once per flow configuration, keeps that and one-off torch start-up costs out
    # of the measured rows.
    t0 = time.perf_counter()
    warm = build_corpus(WARMUP_IMAGES, args.size, args.seed + 1)
    warm_shards = write_shards(warm, root / "warmup" / "shards")
    for i, clip in enumerate(c for c in (ClipSettings(), tiny, real) if c is not None):
        run_flow(warm_shards, root / "warmup" / f"ws-{i}", clip, args.batch_size)
    warmup_s = time.perf_counter() - t0
    print(
        f"warm-up: {WARMUP_IMAGES}-image flow runs (starts Prefect's ephemeral server) took "
        f"{warmup_s:.1f} s; not charged to any row\n",
        flush=True,
    )

    configs = [FlowConfig("ingest flow, no embeddings", ClipSettings())]
    if tiny is not None:
        configs.append(FlowConfig("ingest flow + tiny stand-in CLIP embeddings", tiny))
    if real is not None:
        configs.append(FlowConfig(f"ingest flow + {real.model} embeddings", real))
    raw_times: list[float] = []
    decode_times: list[float] = []
    reingest_times: list[float] = []
    reingest_notes: list[str] = []
    decode_failures = 0
    # Round robin: a burst of load from another process hits one round of every row, not
    # every repeat of one row.
    for rep in range(args.repeats):
        raw_times.append(time_raw_decode(images))
        seconds, decode_failures = time_decode_image(images)
        decode_times.append(seconds)
        for n, config in enumerate(configs):
            workspace = root / "workspaces" / f"config{n}-run{rep}"
            config.run(shards, len(images), workspace, args.batch_size)
            if n == 0:
                # Same source again into the same workspace: every sample is already present,
                # the path a resumed run takes over its committed shards.
                wall, again = run_flow(shards, workspace, config.clip, args.batch_size, fresh=False)
                reingest_times.append(wall)
                if (again.already_present, again.ingested) != (len(images), 0):
                    reingest_notes.append(
                        f"re-ingest: {again.already_present} present, {again.ingested} new"
                    )
    baseline = Measurement(
        "raw decode: PIL open + load + convert RGB (baseline)",
        len(images),
        statistics.median(raw_times),
    )
    rows = [
        baseline,
        Measurement(
            "`decode_image`: decode + SHA-256 + pHash",
            len(images) - decode_failures,
            statistics.median(decode_times),
            f"{decode_failures} decode failures" if decode_failures else "",
        ),
    ]
    for config in configs:
        rows.extend(config.measurements())
    rows.append(
        Measurement(
            "re-ingest, no embeddings: all already present (resume skip path), wall clock",
            len(images),
            statistics.median(reingest_times),
            " | ".join(reingest_notes),
        )
    )

    problems = print_report(args, rows, baseline, configs, warmup_s)
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.1f} s")
    return 1 if problems else 0


def print_report(
    args: argparse.Namespace,
    rows: Sequence[Measurement],
    baseline: Measurement,
    configs: Sequence[FlowConfig],
    warmup_s: float,
) -> int:
    """Print the result table and the notes that qualify it; returns the number of problems."""
    tiny = next((c.clip for c in configs if c.clip.model == TINY_CLIP_NAME), None)
    print(f"## Results (median of {args.repeats} run(s) per row)\n")
    print(markdown_table(rows, baseline))
    print("")
    print("Notes:")
    print(
        "- ratio = images/s of the row / images/s of raw decode, both measured in this run on "
        "this corpus; only ratios are comparable across machines."
    )
    print(
        "- every flow run ingests into a fresh workspace (no sample is already present); "
        f"ingest batch size {args.batch_size}."
    )
    if tiny is not None:
        print(
            f"- 'tiny stand-in CLIP' is NOT ViT-B-32: a randomly initialised open_clip model "
            f"({json.dumps(TINY_CLIP_ARCH)}), device {args.device}, batch "
            f"{args.clip_batch_size}. A real CLIP model costs far more per image, so that row "
            "is a LOWER BOUND on the cost (upper bound on throughput) of ingest with embeddings."
        )
    if args.clip_model is not None:
        print(f"- real CLIP row: {args.clip_model} from {args.clip_checkpoint} on {args.device}.")
    print(
        "- wall clock includes Prefect's per-flow and per-task orchestration (API calls to the "
        "ephemeral server); 'inside the flow' is IngestSummary.seconds, from the flow's first "
        "step to the duplicate-group computation."
    )
    print(
        f"- the Prefect server start-up was paid by the warm-up ({warmup_s:.1f} s), not by a row."
    )
    for config in configs:
        last = config.summaries[-1]
        print(
            f"- {config.label}: ingested {last.ingested:,}, quarantined {last.quarantined}, "
            f"embeddings {last.embeddings!r}, duplicates {last.duplicates}"
        )
        near_rows = last.duplicates.get("near_rows", 0)
        if config.clip is tiny and near_rows > last.ingested // 2:
            print(
                f"  - the stand-in's RANDOM weights embed most images alike, so near-duplicate "
                f"groups cover {near_rows:,} rows: the dedup step compares far more CLIP pairs "
                "than it would with real weights."
            )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(
            f"- load average at the end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / "
            f"{load[2]:.2f} on {os.cpu_count()} CPUs; other processes running at the same time "
            "skew rows unevenly (torch's OpenMP threads suffer most), so rerun on a quiet machine."
        )
    problems = [r for r in rows if r.note]
    for row in problems:
        print(f"- PROBLEM in '{row.configuration}': {row.note}")
    return len(problems)


# --------------------------------------------------------------------------------------------
# Scaling mode (--sizes, --workers)


@dataclass
class ScalingRow:
    """One flow configuration at one image size: wall and inside-the-flow seconds per run."""

    size: int
    workers: int
    dask: bool = False
    walls: list[float] = field(default_factory=list)
    insides: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _scaling_line(
    label: str,
    seconds: float,
    workers: int,
    single: float | None = None,
    *,
    size: int,
    n: int,
    bound: float,
    raw_rate: float,
) -> str:
    rate = n / seconds
    up = f"{rate / single:.2f}" if single is not None and single == single else ""
    return (
        f"| {size} | {label} | {n:,} | {seconds:.2f} | {rate:,.0f} "
        f"| {rate / (bound * workers):.3f} | {up} | {rate / raw_rate:.3f} |"
    )


def _run_scaling(args: argparse.Namespace, root: Path, started: float) -> int:
    import contextlib

    with contextlib.ExitStack() as stack:
        address = None
        if args.dask_workers:
            from distributed import Client

            from diffcurate.flows.sharded import local_cluster

            cluster = stack.enter_context(
                local_cluster(n_workers=args.dask_workers, threads_per_worker=1,
                              processes=True, dashboard_address=":0")
            )  # fmt: skip
            client = stack.enter_context(Client(cluster, set_as_default=False))
            client.wait_for_workers(args.dask_workers, timeout=300)
            address = cluster.scheduler_address
        return _run_scaling_on(args, root, started, address)


def _run_scaling_on(
    args: argparse.Namespace, root: Path, started: float, dask_address: str | None
) -> int:
    from diffcurate.config import ClipSettings

    print("# diffcurate ingest benchmark: worker scaling\n")
    print(f"command: `{shlex.join(sys.orig_argv)}`\n")
    print("machine:")
    for line in machine_description():
        print(line)
    print("", flush=True)
    t0 = time.perf_counter()
    warm = build_corpus(WARMUP_IMAGES, 64, args.seed + 1)
    warm_shards = write_shards(warm, root / "warmup" / "shards")
    run_flow(warm_shards, root / "warmup" / "ws", ClipSettings(), args.batch_size)
    if dask_address is not None:  # shards of 2: every worker's first tasks run here
        run_flow(warm_shards, root / "warmup" / "ws-dask", ClipSettings(), 2,
                 dask_address=dask_address)  # fmt: skip
    print(f"warm-up (Prefect's ephemeral server): {time.perf_counter() - t0:.1f} s, not charged\n")

    lines = [
        "| size | configuration | images | seconds | images/s | ratio to decode+hash bound "
        "| speed-up vs 1 process | ratio to raw decode |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    problems = 0
    for size in args.sizes:
        corpus = build_corpus(args.n_images, size, args.seed, with_digits=size <= 64)
        shards = write_shards(corpus, root / f"corpus-{size}" / "shards")
        images = [s.image for s in corpus.samples]
        mib = sum(len(b) for b in images) / 2**20
        print(
            f"corpus {size}px: {len(images):,} images ({corpus.n_digits:,} digit PNGs, "
            f"{corpus.n_crops:,} photo-crop JPEGs; {mib:.1f} MiB encoded)",
            flush=True,
        )
        raw: list[float] = []
        decode: list[float] = []
        rows = [ScalingRow(size, w) for w in args.workers]
        if dask_address is not None:
            rows.append(ScalingRow(size, args.dask_workers, dask=True))
        for rep in range(args.repeats):  # round robin, as in the default mode
            raw.append(time_raw_decode(images))
            decode.append(time_decode_image(images)[0])
            for row in rows:
                kind = "dask" if row.dask else "w"
                ws = root / "workspaces" / f"{size}-{kind}{row.workers}-run{rep}"
                wall, summary = run_flow(
                    shards, ws, ClipSettings(), args.batch_size, workers=row.workers,
                    dask_address=dask_address if row.dask else None,
                )  # fmt: skip
                row.walls.append(wall)
                row.insides.append(summary.seconds)
                if note := check_summary(summary, len(images), embeddings=False):
                    row.notes.append(note)
        n = len(images)
        raw_rate = n / statistics.median(raw)
        bound = n / statistics.median(decode)
        single = n / statistics.median(rows[0].walls) if rows[0].workers == 1 else float("nan")

        line = functools.partial(_scaling_line, size=size, n=n, bound=bound, raw_rate=raw_rate)
        lines.append(line("raw decode (PIL open + load + RGB), 1 process", n / raw_rate, 1))
        lines.append(
            line("`decode_image` (decode + SHA-256 + pHash), 1 process: the bound", n / bound, 1)
        )
        for row in rows:
            who = f"Dask, {row.workers} workers" if row.dask else f"{row.workers} process(es)"
            lines.append(line(f"ingest flow, {who}, wall clock",
                              statistics.median(row.walls), row.workers, single))  # fmt: skip
            lines.append(line(f"ingest flow, {who}, inside the flow",
                              statistics.median(row.insides), row.workers))  # fmt: skip
            for note in row.notes:
                problems += 1
                lines.append(f"| {size} | PROBLEM ({row.workers} process(es)): {note} |||||||")
    print(f"\n## Results (median of {args.repeats} run(s) per row)\n")
    print("\n".join(lines))
    print("\nNotes:")
    print(
        "- decode+hash bound for w processes = w x the single-process `decode_image` rate "
        "measured in this run on this corpus; ratio to it = images/s / (w x that rate), so 1.0 "
        "is perfect per-process efficiency. 'speed-up' = flow images/s / the 1-process flow's."
    )
    print(
        "- 1 process: the flow decodes in its own process; w > 1: a forkserver pool of w "
        "processes decodes while the flow's process reads, validates and writes (pool start-up "
        "is charged to the row); Dask rows decode on a local cluster started once before the "
        "warm-up (not charged). No embeddings; every run ingests into a fresh workspace; "
        f"batch size {args.batch_size}."
    )
    load = os.getloadavg()
    print(
        f"- load average at the end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} on {os.cpu_count()} CPUs (other processes share them)."
    )
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
