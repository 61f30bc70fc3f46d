"""Cost of the per-sample GGN trace vs plain training passes, and memory vs corpus size.

Part 1, time: scoring N samples with k Hutchinson probes (one draw per sample), as a ratio to N
plain forward+backward passes of the same diffusion loss on the same model, batched the way
training would be. Seed 000 (Lemma C.3) models the cost as about 1 + γk forward passes per
sample (γ ≈ 1-4): the ratio should grow roughly linearly in k.

Part 2, memory: peak resident memory of scoring a corpus of N1 and of N2 > N1 samples in
fixed-size shards (the score flow's streaming loop), each in a fresh subprocess. Peak memory
must depend on the shard size, not on the corpus size.

Run:  .venv/bin/python benchmarks/trace_cost.py      (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from diffcurate.influence.registry import ScorerSpec, score_function
from diffcurate.models.reference import reference_model


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def plain_passes(model, images: torch.Tensor, batch: int, seed: int) -> float:
    """Seconds for forward+backward of the diffusion loss over every image once (batched)."""
    spec = ScorerSpec(signal="loss", timesteps=(20,), draws_per_timestep=1, seed=seed)
    obj = spec.objective(model.scheduler)
    draws = obj.draws([str(i) for i in range(len(images))], images.shape[1:])
    unet = model.unet.train()
    start = time.perf_counter()
    for a in range(0, len(images), batch):
        x0 = images[a : a + batch]
        t, eps = draws.t[a : a + batch, 0], draws.eps[a : a + batch, 0]
        out = unet(obj.noisy(x0, t, eps), t).sample
        loss = torch.nn.functional.mse_loss(out, obj.target(x0, t, eps))
        unet.zero_grad(set_to_none=True)
        loss.backward()
    return time.perf_counter() - start


def trace_seconds(model, images: torch.Tensor, probes: int, seed: int) -> float:
    spec = ScorerSpec(
        signal="trace", timesteps=(20,), draws_per_timestep=1, probes=probes, seed=seed
    )
    keys = [str(i) for i in range(len(images))]
    start = time.perf_counter()
    score_function(spec)(spec.objective(model.scheduler), model.unet, images, keys, None)
    return time.perf_counter() - start


def _memory_child(n: int, shard: int, probes: int, seed: int) -> None:
    """Score n samples in shards (fresh process); print peak RSS in MiB as JSON."""
    model = reference_model("digits-8px", seed=seed)
    spec = ScorerSpec(
        signal="trace", timesteps=(20,), draws_per_timestep=1, probes=probes, seed=seed
    )
    fn, obj = score_function(spec), spec.objective(model.scheduler)
    done = 0
    for a in range(0, n, shard):
        x = _images(min(shard, n - a), seed + a)
        fn(obj, model.unet, x, [str(a + i) for i in range(len(x))], None)
        done += len(x)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": done, "peak_mib": peak_mib}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=128, help="samples for the time ratios")
    parser.add_argument("--probes", default="1,5,20", help="probe counts to compare")
    parser.add_argument("--batch", type=int, default=64, help="batch of the plain passes")
    parser.add_argument("--memory-sizes", default="256,2048", help="two corpus sizes")
    parser.add_argument("--shard", type=int, default=128, help="shard size for the memory test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0

    print("# Per-sample GGN trace: cost and memory\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}\n"
    )
    model = reference_model("digits-8px", seed=args.seed)
    images = _images(args.n, args.seed)
    plain_passes(model, images[: args.batch], args.batch, args.seed)  # warm-up
    trace_seconds(model, images[:8], 1, args.seed)  # warm-up
    base = plain_passes(model, images, args.batch, args.seed)
    print(
        f"model: digits-8px ({sum(p.numel() for p in model.unet.parameters()):,} params), "
        f"N = {args.n} samples, one draw each, t = 20\n"
    )
    print("| probes k | trace seconds | plain fwd+bwd seconds | ratio | ratio per probe |")
    print("|---:|---:|---:|---:|---:|")
    for k in (int(p) for p in args.probes.split(",")):
        secs = trace_seconds(model, images, k, args.seed)
        ratio = secs / base
        print(f"| {k} | {secs:.2f} | {base:.2f} | {ratio:.1f}x | {ratio / k:.1f}x |", flush=True)

    print("\n| corpus size | shard size | peak RSS (MiB) |")
    print("|---:|---:|---:|")
    peaks = []
    for n in (int(s) for s in args.memory_sizes.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            str(n),
            str(args.shard),
            "2",
            str(args.seed),
        ]
        res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        peaks.append(res["peak_mib"])
        print(f"| {res['n']} | {args.shard} | {res['peak_mib']:.0f} |", flush=True)
    print(f"\npeak memory ratio (largest / smallest corpus): {max(peaks) / min(peaks):.2f}")
    print(
        "\nratio = trace time / time of the same number of plain training passes (batched "
        f"{args.batch}); the per-sample trace needs per-sample gradients, so it cannot share "
        "one backward across a batch the way training does."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
