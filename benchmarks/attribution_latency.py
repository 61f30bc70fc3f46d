"""DMin attribution: query latency (indexed vs exact), recall@10, and sketch storage per sample.

Part 1, real sketches: the ``digits-8px`` reference model (701k parameters), briefly trained on
scikit-learn digits (``--train-steps``; an untrained UNet's gradients are dominated by a few
output parameters), sketches real digits with
:func:`diffcurate.influence.dmin.sketch_gradients` at T = 10 evenly spaced timesteps (the
paper's LoRA setting). Reported: sketch
time per sample, bytes per sample of the raw float32 per-timestep gradients vs the stored
sketch (in theory and on disk in LanceDB), the compression ratio, and the largest error of the
sketch inner products against the exact normalised-gradient cosines of the same samples, next to
the bound 6·sqrt(2/v) the tests use.

Part 2, latency at scale: N synthetic DMin-like sketches (clusters of unit per-timestep blocks
with within-cluster cosines ≈ 0.5, norms jittered by sqrt(2/v) like real sketches; generating
100k real sketches would take hours on a CPU) are written to a LanceDB sketches table through
``SketchStore.write`` and indexed (IVF-HNSW-SQ, dot). For Q queries (new members of random
clusters, like generated images) we time top-10 through the index, an exact flat scan in
LanceDB (``bypass_vector_index``), and an in-RAM numpy matrix product (the exact lower bound
when every sketch fits in memory), and measure recall@10 of the index against exact search.

Run:  .venv/bin/python benchmarks/attribution_latency.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from diffcurate.influence.dmin import (
    DMinConfig,
    SketchOperator,
    attribution_scores,
    evenly_spaced_timesteps,
    inner_product_std_bound,
    per_timestep_gradients,
    sketch_gradients,
)
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, train
from diffcurate.storage.sketches import SketchStore

CHUNK = 10_000


def digits(n: int) -> torch.Tensor:
    """The first n scikit-learn digits as ``[n, 1, 8, 8]`` in [-1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits().images[:n].astype(np.float32) / 16.0 * 2 - 1
    return torch.from_numpy(data)[:, None]


def real_sketches(
    n: int, n_t: int, v: int, train_steps: int, seed: int, workdir: str
) -> dict[str, float]:
    """Part 1: sketch n real digits with the reference model; sizes, time, error vs exact."""
    model = reference_model("digits-8px", seed=seed)
    if train_steps:
        cfg_train = TrainConfig(steps=train_steps, batch_size=64, seed=seed, log_every=0)
        train(model, digits(1797), cfg_train, progress=False)
    n_params = sum(p.numel() for p in model.unet.parameters())
    schedule = TimestepSchedule(timesteps=evenly_spaced_timesteps(n_t))
    obj = DiffusionObjective(model.scheduler, schedule, seed=seed)
    x, keys = digits(n), [f"digit-{i}" for i in range(n)]
    cfg = DMinConfig(sketch_dim=v, seed=seed, batch_size=8)
    sketch_gradients(obj, model.unet, x[:2], keys[:2], cfg)  # warm-up
    start = time.perf_counter()
    sk = sketch_gradients(obj, model.unet, x, keys, cfg)
    per_sample_s = (time.perf_counter() - start) / n
    grads = per_timestep_gradients(obj, model.unet, x, keys, cfg)  # float32: n·T·L numbers
    exact = attribution_scores(grads, grads).numpy() / n_t
    approx = attribution_scores(sk, sk).numpy() / n_t
    iu = np.triu_indices(n, k=1)
    store = SketchStore(os.path.join(workdir, "real"))
    store.write("real", "digits", keys, sk.numpy(), schedule.timesteps)
    op = SketchOperator.create(n_params, v, seed)
    return {
        "n_params": n_params,
        "per_sample_s": per_sample_s,
        "raw_bytes": 4 * n_t * n_params,
        "sketch_bytes": 4 * n_t * v,
        "disk_bytes": store.stored_bytes() / n,
        "operator_bytes": op.storage_bytes(),
        "max_err": float(np.abs(approx - exact)[iu].max()),
        "rms_err": float(np.sqrt(np.mean((approx - exact)[iu] ** 2))),
        "mean_abs_cos": float(np.abs(exact[iu]).mean()),
    }


def synthetic(
    n: int, n_t: int, v: int, seed: int, centres: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered DMin-like sketches ``[n, T, v]`` float32 (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((100, n_t, v)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + rng.standard_normal((n, n_t, v), dtype=np.float32) / np.sqrt(v)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x *= 1 + np.sqrt(2 / v) * rng.standard_normal((n, n_t, 1), dtype=np.float32)
    return x.astype(np.float32), centres


def latency(n: int, n_t: int, v: int, n_q: int, n_exact: int, seed: int, workdir: str) -> dict:
    """Part 2 for one corpus size."""
    store = SketchStore(os.path.join(workdir, f"n{n}"))
    centres = synthetic(1, n_t, v, seed)[1]
    mats = []
    write_s = 0.0
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        chunk, _ = synthetic(m, n_t, v, seed + 1 + start, centres)
        t0 = time.perf_counter()
        store.write("bench", "synthetic", [f"s{start + i:07d}" for i in range(m)], chunk, [0] * n_t)
        write_s += time.perf_counter() - t0
        mats.append(chunk.reshape(m, -1))
    train = np.concatenate(mats)
    del mats
    t0 = time.perf_counter()
    store.create_index()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 999)
    q = centres[rng.integers(0, len(centres), n_q)] + rng.standard_normal(
        (n_q, n_t, v), dtype=np.float32
    ) / np.sqrt(v)
    q = (q / np.linalg.norm(q, axis=-1, keepdims=True)).reshape(n_q, -1).astype(np.float32)

    t0 = time.perf_counter()
    scores = q @ train.T  # exact, in RAM
    numpy_ms = (time.perf_counter() - t0) / n_q * 1e3
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    store.top_k(q[:1], 10, "bench")  # warm-up (opens the index)
    idx_ms, hits = [], 0
    for i in range(n_q):
        t0 = time.perf_counter()
        res = store.top_k(q[i], 10, "bench")[0]
        idx_ms.append((time.perf_counter() - t0) * 1e3)
        hits += len({f"s{j:07d}" for j in truth[i]} & set(res.sample_ids))
    exact_ms, agree = [], 0
    for i in range(n_exact):
        t0 = time.perf_counter()
        res = store.top_k(q[i], 10, "bench", exact=True)[0]
        exact_ms.append((time.perf_counter() - t0) * 1e3)
        agree += len({f"s{j:07d}" for j in truth[i]} & set(res.sample_ids))
    return {
        "n": n,
        "write_s": write_s,
        "build_s": build_s,
        "idx_ms": float(np.median(idx_ms)),
        "idx_p95_ms": float(np.percentile(idx_ms, 95)),
        "exact_ms": float(np.median(exact_ms)),
        "numpy_ms": numpy_ms,
        "recall": hits / (10 * n_q),
        "exact_agree": agree / (10 * n_exact),
        "disk_bytes": store.stored_bytes() / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="corpus sizes (sketches)")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="v per timestep")
    parser.add_argument("--timesteps", type=int, default=1, help="T timesteps per sample")
    parser.add_argument("--queries", type=int, default=50, help="queries for indexed latency")
    parser.add_argument("--exact-queries", type=int, default=10, help="queries for exact scans")
    parser.add_argument("--real", type=int, default=16, help="real digits sketched in part 1")
    parser.add_argument("--real-timesteps", type=int, default=10, help="T in part 1")
    parser.add_argument("--train-steps", type=int, default=300, help="training before part 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_t, v = args.timesteps, args.sketch_dim

    print("# DMin attribution: latency, recall and storage\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}\n"
    )
    workdir = tempfile.mkdtemp(prefix="dmin-bench-")
    try:
        real_t = args.real_timesteps
        real = real_sketches(args.real, real_t, v, args.train_steps, args.seed, workdir)
        bound = 6 * inner_product_std_bound(v)
        print(
            f"## Storage per sample (digits-8px, {real['n_params']:,} params, trained "
            f"{args.train_steps} steps, T = {real_t} timesteps, v = {v})\n"
        )
        print("| what | bytes per sample | ratio to raw gradient |")
        print("|---|---:|---:|")
        raw = real["raw_bytes"]
        print(f"| raw per-timestep gradients, T·L float32 | {raw:,} | 100% |")
        print(
            f"| sketch, T·v float32 | {real['sketch_bytes']:,} | {real['sketch_bytes'] / raw:.3%} |"
        )
        print(
            f"| sketch row on disk (LanceDB, {args.real} rows) | {real['disk_bytes']:,.0f} | "
            f"{real['disk_bytes'] / raw:.3%} |"
        )
        print(
            f"\nOperator (permutation int32 + sign bits), stored once per run: "
            f"{real['operator_bytes']:,} bytes. Sketching: {real['per_sample_s'] * 1e3:.0f} ms "
            f"per sample (float32, batch 8). Sketch vs exact gradient cosine over "
            f"{args.real * (args.real - 1) // 2} pairs of real digits (score / T): max |error| "
            f"{real['max_err']:.4f}, RMS {real['rms_err']:.4f} (bound 6·sqrt(2/v) = "
            f"{bound:.4f}; mean |cosine| {real['mean_abs_cos']:.3f}).\n"
        )
        print(f"## Top-10 query latency (synthetic sketches, width T·v = {n_t * v})\n")
        print(
            "| sketches | write s | index build s | indexed ms (p50 / p95) | exact scan ms | "
            "exact / indexed | numpy in-RAM ms/query | recall@10 | disk bytes/sample |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in (int(s) for s in args.sizes.split(",")):
            r = latency(n, n_t, v, args.queries, args.exact_queries, args.seed, workdir)
            print(
                f"| {r['n']:,} | {r['write_s']:.1f} | {r['build_s']:.1f} | "
                f"{r['idx_ms']:.1f} / {r['idx_p95_ms']:.1f} | {r['exact_ms']:.0f} | "
                f"{r['exact_ms'] / r['idx_ms']:.1f}x | {r['numpy_ms']:.1f} | {r['recall']:.3f} | "
                f"{r['disk_bytes']:,.0f} |",
                flush=True,
            )
            if r["exact_agree"] < 1.0:
                print(f"\n(LanceDB exact scan vs numpy top-10 agreement: {r['exact_agree']:.3f})")
        print(
            f"\nIndexed = IVF-HNSW-SQ (1 partition, M = 16, ef_construction = 100), ef = 100; "
            f"exact scan = LanceDB flat search over every row of the run; recall@10 = overlap "
            f"of the indexed top-10 with the exact top-10 over {args.queries} queries; exact scan "
            f"timed on {args.exact_queries} of them; numpy = one batched float32 matrix product of "
            f"all queries against the in-RAM sketches, per query."
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
