"""Mitigation without retraining, chosen by measurement: every method on Table 1's corpus.

Corpus, reference recipe, scoring and measurement are ``benchmarks/table1.py``'s (real 8×8
digits with exact-duplicate, near-duplicate and unique-but-overtrained secrets; a two-phase
recipe; Mem% with one τ calibrated on the reference at 5% held-out false positives; FD/KID on
random-projection features against held-out digits). Per seed: train the reference, score it
with ``--scorer`` (the hygiene run's default), flag the oracle-sized budget, split kept and
removed samples, then produce one candidate per mitigation row and measure it.

Rows (``--rows``, ``name:method:key=value,...``; defaults below) cover:

* ``seed000``: seed 000's surgical fine-tune, 1 epoch at lr 2e-6;
* ``finetune-*``: the fine-tune sweep, lr × steps with 10% linear warm-up;
* ``layer-finetune``: only the layers where the removed samples' trace concentrates;
* ``erasediff-*``: EraseDiff unlearning of the removed samples;
* ``gradient-ascent``: retain loss minus a capped ascent on the removed samples;
* ``retrain``: the two-phase recipe from a fresh initialisation on the kept samples (the
  compute yardstick: ``(1500 + 400) × 64`` sample passes).

Columns: Mem% and its reduction vs the reference (the no-pruning, no-mitigation control), FD
change and KID, and compute as a ratio to retraining, both in sample passes (forward+backward
evaluations of one sample) and in wall seconds measured in the same process. Mean ± s.e. over
``--seeds``.

Run:  .venv/bin/python benchmarks/mitigation.py --seeds 3          (see results/mitigation.md)
      .venv/bin/python benchmarks/mitigation.py --steps 200 --overtrain-steps 50
        --generations 64 --rows seed000,erasediff-1e-4 --seeds 1    (smoke run, ~2 minutes)
"""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcurate.curation.flag import FlagPolicy, select_removals
from diffcurate.mitigation import MitigationConfig, fresh_copy, mitigate
from diffcurate.models.diffusion import load_diffusion_model, save_diffusion_model
from diffcurate.models.reference import reference_model
from table1 import (
    build_parser,
    build_table1_corpus,
    mean_se,
    measure,
    method_scores,
    train_recipe,
)

RETRAIN = "retrain"
ROWS: dict[str, str] = {
    "seed000": "finetune:epochs=1,lr=2e-6",
    "finetune-1e-4x64": "finetune:steps=64,lr=1e-4,warmup_steps=6",
    "finetune-1e-4x190": "finetune:steps=190,lr=1e-4,warmup_steps=19",
    "finetune-1e-3x64": "finetune:steps=64,lr=1e-3,warmup_steps=6",
    "finetune-1e-3x190": "finetune:steps=190,lr=1e-3,warmup_steps=19",
    "finetune-1e-3x32": "finetune:steps=32,lr=1e-3,warmup_steps=3",
    "finetune-1e-3x128": "finetune:steps=128,lr=1e-3,warmup_steps=13",
    "finetune-3e-4x190": "finetune:steps=190,lr=3e-4,warmup_steps=19",
    "finetune-2e-3x64": "finetune:steps=64,lr=2e-3,warmup_steps=6",
    "layer-finetune": "layer-finetune:steps=190,lr=1e-3,warmup_steps=19",
    "layer-finetune-0.9": "layer-finetune:steps=190,lr=1e-3,warmup_steps=19,layer_coverage=0.9",
    "erasediff-1e-4": "erasediff:steps=60,lr=1e-4,warmup_steps=6",
    "erasediff-3e-4": "erasediff:steps=60,lr=3e-4,warmup_steps=6",
    "erasediff-1e-3": "erasediff:steps=60,lr=1e-3,warmup_steps=6",
    "erasediff-1e-4x10": "erasediff:steps=10,lr=1e-4,warmup_steps=1",
    "gradient-ascent-1e-5": "gradient-ascent:steps=120,lr=1e-5,warmup_steps=12",
    "gradient-ascent-1e-4": "gradient-ascent:steps=120,lr=1e-4,warmup_steps=12",
    RETRAIN: RETRAIN,
}
"""Row name -> ``method:key=value,...`` (MitigationConfig fields)."""


@dataclass
class Row:
    seed: int
    name: str
    method: str
    settings: str
    mem: float
    mem_by_kind: dict[str, float]
    fd: float
    kid: float
    sample_passes: int = 0
    seconds: float = 0.0
    removed_samples: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def config_of(spec: str, seed: int, args) -> MitigationConfig:
    method, _, rest = spec.partition(":")
    values: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        field_type = MitigationConfig.model_fields[key].annotation
        values[key] = int(value) if field_type in (int, int | None) else float(value)
    return MitigationConfig(method=method, seed=seed, device=args.device,
                            batch_size=args.batch_size, **values)  # fmt: skip


def kinds(m, corpus) -> dict[str, float]:
    out = {}
    for kind in ("exact", "near", "unique"):
        hits = [s.reconstructed for s in m.mem.secrets if corpus.secret_kind[s.secret_id] == kind]
        out[kind] = 100.0 * float(np.mean(hits)) if hits else math.nan
    return out


def run_seed(args, seed: int, rows: list[Row], flush, log) -> None:
    torch.manual_seed(seed)
    corpus = build_table1_corpus(args, seed)
    cached = Path(args.reference_cache) / f"seed-{seed}" if args.reference_cache else None
    if cached is not None and (cached / "unet").is_dir():  # the recipe is deterministic
        reference, secs = load_diffusion_model(cached), 0.0
        log(f"seed {seed}: reference loaded from {cached}")
    else:
        reference = reference_model("digits-8px", seed=seed)
        secs = train_recipe(reference, corpus, corpus.keys, args, seed)
        if cached is not None:
            save_diffusion_model(reference, cached)
    before = measure(reference, corpus, args, seed)
    tau = before.calibration.tau if before.calibration else None
    rows.append(Row(seed, "none", "none", "the reference (no pruning, no mitigation)",
                    before.mem.mem_percent, kinds(before, corpus), before.fd, before.kid.mean,
                    seconds=secs))  # fmt: skip
    flush()
    log(f"seed {seed}: reference {secs:.0f} s, tau {tau:.4f}, Mem% {before.mem.mem_percent:.1f}")
    scores = method_scores(args.scorer, reference, corpus, args, seed)
    distinct = corpus.distinct
    planted = [k for k in distinct if k in corpus.planted]
    flag = select_removals(
        distinct, scores, policy=FlagPolicy(fraction=len(planted) / len(distinct))
    )
    flagged = set(flag.flagged_ids)
    kept = [k for k in corpus.keys if corpus.group_of.get(k, k) not in flagged]
    removed = [k for k in corpus.keys if corpus.group_of.get(k, k) in flagged]
    for name in args.rows:
        spec = ROWS.get(name, name)
        t0 = time.perf_counter()
        if spec == RETRAIN:  # the same two-phase recipe as the reference, on the kept samples
            candidate = fresh_copy(reference, seed + 1)
            train_recipe(candidate, corpus, kept, args, seed + 1)
            n_overtrained = len([k for k in corpus.overtrained if k in set(kept)])
            passes = (args.steps + (args.overtrain_steps if n_overtrained else 0)) * args.batch_size
            method, settings = (
                RETRAIN,
                f"{args.steps} + {args.overtrain_steps} steps at lr {args.lr:g}",
            )
        else:
            config = config_of(spec, seed, args)
            candidate, result = mitigate(reference, corpus.rows(kept), config,
                                         removed_images=corpus.rows(removed))  # fmt: skip
            passes, method, settings = result.sample_passes, config.method, spec.partition(":")[2]
        seconds = time.perf_counter() - t0
        m = measure(candidate, corpus, args, seed, tau=tau)
        rows.append(Row(seed, name, method, settings, m.mem.mem_percent, kinds(m, corpus), m.fd,
                        m.kid.mean, passes, seconds, len(removed)))  # fmt: skip
        flush()
        log(f"seed {seed}: {name:>18} Mem% {m.mem.mem_percent:5.1f}  FD {m.fd:.3f}  "
            f"passes {passes}  {seconds:.0f} s")  # fmt: skip


def fmt(mean: float, se: float, digits: int, suffix: str = "") -> str:
    return f"{mean:.{digits}f}{suffix}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def table(rows: list[Row]) -> str:
    """Per row name: means ± s.e. over seeds of per-seed figures relative to that seed's
    reference (Mem% reduction, FD change) and its retrain row (compute ratios)."""
    seeds = sorted({r.seed for r in rows})
    ref = {r.seed: r for r in rows if r.name == "none"}
    retrain = {r.seed: r for r in rows if r.name == RETRAIN}
    lines = [
        "| row | method | settings | Mem% | exact / near / unique | Mem% reduction vs none "
        "| FD | FD change vs none | KID | compute vs retrain (passes) | wall vs retrain |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r.name for r in rows):
        rs = [r for r in rows if r.name == name and r.seed in ref]
        if not rs:
            continue
        mem = mean_se([r.mem for r in rs])
        kinds_ = " / ".join(f"{np.nanmean([r.mem_by_kind[k] for r in rs]):.0f}"
                            for k in ("exact", "near", "unique"))  # fmt: skip
        fd = mean_se([r.fd for r in rs])
        kid = mean_se([r.kid for r in rs])
        if name == "none":
            lines.append(f"| none | - | {rs[0].settings} | {fmt(*mem, 1)} | {kinds_} | - | "
                         f"{fmt(*fd, 3)} | - | {fmt(*kid, 3)} | - | - |")  # fmt: skip
            continue
        red = mean_se([100 * (ref[r.seed].mem - r.mem) / ref[r.seed].mem for r in rs])
        dfd = mean_se([100 * (r.fd - ref[r.seed].fd) / ref[r.seed].fd for r in rs])
        with_retrain = [r for r in rs if r.seed in retrain]
        passes = mean_se([r.sample_passes / retrain[r.seed].sample_passes for r in with_retrain]
                         or [math.nan])  # fmt: skip
        wall = mean_se([r.seconds / retrain[r.seed].seconds for r in with_retrain] or [math.nan])
        lines.append(
            f"| {name} | {rs[0].method} | {rs[0].settings} | {fmt(*mem, 1)} | {kinds_} | "
            f"{fmt(*red, 0, '%')} | {fmt(*fd, 3)} | {fmt(*dfd, 1, '%')} | {fmt(*kid, 3)} | "
            f"{fmt(*passes, 3)} | {fmt(*wall, 3)} |"
        )
    n = len(seeds)
    lines.append(f"\n{n} seed(s) ({', '.join(map(str, seeds))}); ± = standard error over seeds.")
    return "\n".join(lines)


FIELDS = ["seed", "name", "method", "settings", "mem", "mem_exact", "mem_near", "mem_unique",
          "fd", "kid", "sample_passes", "seconds", "removed_samples"]  # fmt: skip


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in rows:
            w.writerow([r.seed, r.name, r.method, r.settings, f"{r.mem:.2f}",
                        *(f"{r.mem_by_kind[k]:.2f}" for k in ("exact", "near", "unique")),
                        f"{r.fd:.5f}", f"{r.kid:.5f}", r.sample_passes, f"{r.seconds:.2f}",
                        r.removed_samples])  # fmt: skip


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        return [
            Row(
                int(r["seed"]),
                r["name"],
                r["method"],
                r["settings"],
                float(r["mem"]),
                {k: float(r[f"mem_{k}"]) for k in ("exact", "near", "unique")},
                float(r["fd"]),
                float(r["kid"]),
                int(r["sample_passes"]),
                float(r["seconds"]),
                int(r["removed_samples"]),
            )
            for r in csv.DictReader(f)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    add = parser.add_argument
    add("--scorer", default="divergence", help="risk signal that picks the removed samples")
    add("--rows", default=",".join(ROWS), help="comma-separated row names (or method:k=v specs)")
    add("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed+seeds-1")
    add("--reference-cache", default=None,
        help="save each seed's trained reference here and reuse it when present (the recipe is "
        "deterministic on one device and thread count)")  # fmt: skip
    args = parser.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()
    out = Path(args.out if args.out != "workspace/benchmarks/table1" else
               "workspace/benchmarks/mitigation")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    header = [
        "# Mitigation without retraining: prune, mitigate, measure\n",
        f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
        f"commit: {commit}",
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}, device {args.device}",
    ]
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    if args.render:  # rows of several runs; the same (seed, row) twice: the first wins
        seen: set[tuple[int, str]] = set()
        for path in args.render:
            for r in read_csv(Path(path)):
                if (r.seed, r.name) not in seen:
                    seen.add((r.seed, r.name))
                    rows.append(r)
    else:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run_seed(args, seed, rows, lambda: write_csv(rows, out / "mitigation.csv"),
                     lambda s: print("  " + s, file=sys.stderr, flush=True))  # fmt: skip
    body = table(rows)
    print(body, flush=True)
    (out / "mitigation.md").write_text("\n".join(header) + "\n\n" + body + "\n")
    write_csv(rows, out / "mitigation.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
