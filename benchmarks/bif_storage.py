"""BIF posterior states stored on disk vs replayed by each worker: bytes and seconds per sample.

For each of two model sizes (the reference ``digits-8px`` UNet and a variant with 4x its
channels), the same corpus is scored in shards against the same SGLD chains in two ways, each
in a fresh subprocess (so peak memory is its own), alternated in one run:

* ``stored``: the parent records every state (C·T·d numbers, ``bif_draws.PosteriorDraws``);
  each shard reads them back;
* ``replay``: the parent records only a digest per state (``bif_replay.ReplayedDraws``); each
  shard replays the chains from their keys and checks every state against its digest.

Both share the fit set (the SGLD set) with the workers. Reported: bytes stored (record files
plus the fit set), seconds per sample (record + all shards, divided by the corpus size), the
split of a shard's time into chain replay and loss evaluation, peak RSS, and whether the two
paths' scores are bit-identical. Ratios are replay / stored. A projection to the library defaults
(4 chains x 100 draws) and to a Stable-Diffusion-1.5-size UNet follows from the measured
formula: stored = C·T·d·4 bytes, replay = C·T·32 bytes (+ loss trace), both + the fit set.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bif_storage.py  (about 10 minutes, 1 thread)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffcurate.influence.bif_draws import PosteriorDraws
from diffcurate.influence.bif_replay import ReplayedDraws
from diffcurate.influence.registry import BIFOptions, ScorerSpec
from diffcurate.models.reference import reference_architecture

MODELS = {"digits-8px": (32, 64), "digits-8px-4x": (128, 256)}
SD15_UNET_PARAMS = 859_520_964  # runwayml/stable-diffusion-v1-5 unet, for the projection only


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _unet(name: str) -> torch.nn.Module:
    arch = reference_architecture("digits-8px")
    arch = arch.model_copy(update={"name": name, "block_out_channels": MODELS[name]})
    return arch.build(seed=0)


def _spec(args: argparse.Namespace, states: str) -> ScorerSpec:
    return ScorerSpec(
        signal="bif", draws_per_timestep=1, fit_size=args.fit, seed=args.seed,
        bif=BIFOptions(chains=args.chains, draws=args.draws, batch_size=args.batch,
                       states=states),
    )  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def child(args: argparse.Namespace) -> None:
    """One (model, path) measurement in this fresh process; prints JSON, saves the scores."""
    torch.set_num_threads(args.threads)
    name, states, out = args.child
    unet = _unet(name)
    spec = _spec(args, states)
    obj = spec.objective(DDPMScheduler(num_train_timesteps=1000))
    config = spec.bif_config
    fit_x = _images(args.fit, args.seed + 1)
    fit_keys = [f"fit{i}" for i in range(args.fit)]
    x = _images(args.n, args.seed + 2)
    keys = [f"s{i}" for i in range(args.n)]
    with torch.no_grad():  # warm-up: allocator and kernels
        unet(x[:8], torch.full((8,), 20)).sample.sum()
    kind = PosteriorDraws if states == "stored" else ReplayedDraws
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        posterior = kind.record(obj, unet, fit_x, fit_keys, config, Path(tmp) / "rec", None)
        record_s = time.perf_counter() - t0
        shard_s, scores = [], []
        for a in range(0, args.n, args.shard):
            sl = slice(a, a + args.shard)
            t0 = time.perf_counter()
            scores.append(posterior.risk(obj, unet, x[sl], keys[sl]))
            shard_s.append(time.perf_counter() - t0)
        disk = _dir_bytes(Path(tmp) / "rec")
        memory_est = posterior.memory_bytes()
    # The chain alone (what a replayed shard pays on top of the loss evaluation).
    t0 = time.perf_counter()
    ReplayedDraws.record(obj, unet, fit_x, fit_keys, config, Path(args.workdir) / f"c-{out}")
    chain_s = time.perf_counter() - t0
    np.save(out, np.concatenate([s.score for s in scores]))
    print(json.dumps({
        "params": sum(p.numel() for p in unet.parameters()),
        "record_s": record_s, "shard_s": shard_s, "chain_s": chain_s,
        "disk": disk, "fit_bytes": fit_x.nbytes, "memory_est": memory_est,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))  # fmt: skip


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def _bytes(b: float) -> str:
    if b >= 2**40:
        return f"{b / 2**40:,.2f} TiB"
    return _mib(b) if b >= 2**20 else f"{b / 1024:,.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="samples scored")
    parser.add_argument("--shard", type=int, default=128, help="samples per shard")
    parser.add_argument("--fit", type=int, default=64, help="fit set = SGLD set size")
    parser.add_argument("--batch", type=int, default=32, help="SGLD minibatch")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=8, help="recorded draws per chain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where records are written (tmp)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    print("# BIF posterior states: stored vs replayed\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}\n"
    )
    print(
        f"setup: {args.n} random 8x8 images scored in shards of {args.shard}; fit (SGLD) set "
        f"{args.fit}, minibatch {args.batch}; {args.chains} chains x {args.draws} draws "
        f"(b = 0, thinning 1: {args.chains * (args.draws - 1)} SGLD steps per replay); t = 20, "
        "one draw per sample; float32; untrained weights (cost does not depend on them)\n"
    )
    names = ("n", "shard", "fit", "batch", "chains", "draws", "threads", "seed")
    passthrough = [f"--{k}={getattr(args, k)}" for k in names]
    rows = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for name in MODELS:
            scores = {}
            for states in ("stored", "replay"):
                out = str(Path(work) / f"{name}-{states}.npy")
                cmd = [sys.executable, __file__, *passthrough, f"--workdir={work}",
                       "--child", name, states, out]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows[name, states] = json.loads(res.stdout.strip().splitlines()[-1])
                scores[states] = np.load(out)
            rows[name, "equal"] = bool(np.array_equal(scores["stored"], scores["replay"]))

    print("| model | params | path | bytes stored (record + fit set) | s/sample | shard s "
          "(chain + losses) | peak RSS | est. state memory | scores equal |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    ratios = []
    for name in MODELS:
        per = {}
        for states in ("stored", "replay"):
            r = rows[name, states]
            total = r["record_s"] + sum(r["shard_s"])
            per[states] = (r["disk"] + r["fit_bytes"], total / args.n, r["peak_rss"])
            shard = np.mean(r["shard_s"])
            print(
                f"| {name} | {r['params']:,} | {states} | {_bytes(per[states][0])} "
                f"({_bytes(r['disk'])} + {_bytes(r['fit_bytes'])}) | {per[states][1]:.4f} | "
                f"{shard:.2f} | {_mib(r['peak_rss'])} | {_bytes(r['memory_est'])} | "
                f"{'yes' if rows[name, 'equal'] else 'NO'} |"
            )
        ratios.append((name, *(per["replay"][i] / per["stored"][i] for i in range(3))))
    print("\n| model | bytes replay / stored | s/sample replay / stored | peak RSS replay / "
          "stored | chain replay s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name, b, s, m in ratios:
        print(f"| {name} | {b:.4f} | {s:.2f} | {m:.2f} | {rows[name, 'replay']['chain_s']:.2f} |")

    c, t, fit, shard, corpus = 4, 100, 512, 256, 10_000
    print(
        f"\nProjection to the defaults (4 chains x 100 draws, fit set and minibatch {fit}, "
        f"shards of {shard}, a {corpus:,}-sample corpus), float32. Bytes by the formula; "
        "seconds EXTRAPOLATED from this run's unit costs: g = chain seconds per minibatch "
        "sample-step, e = a stored shard's seconds per (sample, draw); stored = chain + "
        "N·C·T·e, replay = (1 + shards)·chain + N·C·T·e:\n"
    )
    print("| model | params d | stored: C·T·d·4 | replay: C·T·(32 + 8) | fit set (both) | "
          "s/sample replay / stored |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    steps = args.chains * (args.draws - 1) * min(args.batch, args.fit)
    for name, d, image_bytes in (
        *((n, rows[n, "stored"]["params"], 8 * 8 * 4) for n in MODELS),
        ("SD-1.5 UNet (512x512 RGB fit images)", SD15_UNET_PARAMS, 3 * 512 * 512 * 4),
    ):
        ratio = "not measured"
        if name in MODELS:
            g = rows[name, "replay"]["chain_s"] / steps
            e = np.mean(rows[name, "stored"]["shard_s"]) / (args.chains * args.draws * args.shard)
            chain = c * (t - 1) * fit * g
            losses = corpus * c * t * e
            replayed = (1 + -(-corpus // shard)) * chain + losses
            ratio = f"{replayed / (chain + losses):.1f}"
        print(f"| {name} | {d:,} | {_bytes(c * t * d * 4)} | {_bytes(c * t * 40)} | "
              f"{_bytes(fit * image_bytes)} | {ratio} |")  # fmt: skip
    print(
        "\nbytes stored = the record's files (stored: states.npy; replay: digests.npy, the loss "
        "trace, meta) + the fit set that travels in state.pt either way. s/sample = (record + "
        "every shard) / samples. shard s = mean seconds per shard; a replayed shard pays one "
        "chain replay (the 'chain replay s' column, independent of the shard size) on top of "
        "the loss evaluation both paths do, so its extra cost per sample falls as 1/shard size. "
        "est. state memory = the library's estimate of what the state adds to a worker beyond "
        "the model's working copy (stored: one state row; replay: w*, gradients, float64 noise, "
        "SGLD-set draws)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
