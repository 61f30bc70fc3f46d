"""Which risk signal, at which timesteps, finds planted memorized images? (issue: trace scorer)

Builds a planted-memorization corpus from real scikit-learn digits, trains the `digits-8px`
reference DDPM on it until it reproduces the planted images, scores every DISTINCT image with
each signal at each timestep, and prints recall@1% and the median rank of the planted images.
All rows are measured in one run on one model, side by side.

Planted set (hashing alone cannot find all of it):
  * exact duplicates: ``--n-exact`` digits, each present ``--copies`` times byte-identically;
  * near duplicates: ``--n-near`` digits, each present ``--copies`` times, every copy shifted
    by a random sub-pixel offset (uniform in ±``--max-shift`` px per axis, bilinear) and with
    Gaussian noise (sigma 0.05 on the [-1, 1] scale), so no two copies share bytes.
    Why sub-pixel: at 8×8 a whole-pixel shift moves the content by 12.5% of the image side
    (64 px at 512 px), a different crop rather than a near-duplicate; ±0.5 px is ±6% of the
    side, the scale of the re-encodes/re-crops near-duplicate detection targets.
    ``--whole-pixel-shift`` keeps the harder variant (np.roll by -1/0/+1 px) as a stress case.
The scored set is one entry per distinct planted image plus the ``--n-base`` ordinary digits:
each exact group's image, and for each near group its FIRST TRAINING COPY (the platform scores
the training samples it holds; the clean original never appears in training).
recall@1% = fraction of planted images among the top ceil(1% of the scored set) by score.

Run:  .venv/bin/python benchmarks/risk_signals.py            (about 15 minutes on 2 CPU cores)
      .venv/bin/python benchmarks/risk_signals.py --steps 300  (quick smoke run: no memorization)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

from diffcurate.influence.registry import ScorerSpec, get_scorer, score_function
from diffcurate.metrics.planted_recall import planted_recall_and_rank
from diffcurate.models.reference import reference_model
from diffcurate.models.sample import generate
from diffcurate.models.train import TrainConfig, train

SIGNALS = ("trace", "divergence", "loss")
"""The per-sample signals compared (none needs dataset-level state)."""


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # [N, 1, 8, 8] in [-1, 1], with planted copies
    scored: torch.Tensor  # distinct images: base + planted originals
    scored_ids: list[str]
    planted: set[str]
    exact: set[str]
    near: set[str]


def build_corpus(
    n_base: int,
    n_exact: int,
    n_near: int,
    copies: int,
    seed: int,
    max_shift: float = 0.5,
    whole_pixel: bool = False,
) -> Corpus:
    """Real 8×8 digits scaled to [-1, 1], with planted exact and near duplicates."""
    from scipy.ndimage import shift as subpixel_shift

    digits = load_digits().images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))
    base_idx = order[:n_base]
    exact_idx = order[n_base : n_base + n_exact]
    near_idx = order[n_base + n_exact : n_base + n_exact + n_near]
    train_imgs = [digits[i] for i in base_idx]
    for i in exact_idx:
        train_imgs += [digits[i]] * copies
    near_reps = []
    for i in near_idx:
        for c in range(copies):
            if whole_pixel:
                dy, dx = rng.integers(-1, 2, size=2)
                shifted = np.roll(digits[i], (dy, dx), axis=(0, 1))
            else:
                offset = rng.uniform(-max_shift, max_shift, size=2)
                shifted = subpixel_shift(digits[i], offset, order=1, mode="constant", cval=-1.0)
            noisy = shifted + rng.normal(0, 0.05, size=shifted.shape).astype(np.float32)
            train_imgs.append(np.clip(noisy, -1, 1).astype(np.float32))
            if c == 0:
                near_reps.append(train_imgs[-1])
    scored_idx = [*base_idx, *exact_idx, *near_idx]
    scored = np.concatenate([digits[[*base_idx, *exact_idx]], np.stack(near_reps)])
    return Corpus(
        train=torch.from_numpy(np.stack(train_imgs)[:, None]),
        scored=torch.from_numpy(scored[:, None]),
        scored_ids=[f"digit-{i}" for i in scored_idx],
        planted={f"digit-{i}" for i in [*exact_idx, *near_idx]},
        exact={f"digit-{i}" for i in exact_idx},
        near={f"digit-{i}" for i in near_idx},
    )


def recall_and_rank(scores: np.ndarray, ids: list[str], planted: set[str]) -> tuple[float, float]:
    """Expected recall@1% (top ceil(1%) by score, ties broken at random) and the median
    mid-rank (1 = riskiest) of planted ids: :func:`planted_recall_and_rank`. Planted images
    come last in the scored set, so position-ordered tie-breaking would be biased."""
    return planted_recall_and_rank(scores, ids, planted, fraction=0.01)


def reproduction_rate(model, corpus: Corpus, n: int, seed: int) -> tuple[float, float]:
    """Share of generated images whose nearest training image (L2) is a planted one, and share
    within L2 distance 1.0 (on [-1, 1] pixels, i.e. RMS 0.125) of a planted original."""
    gen = generate(model, n, seed=seed).reshape(n, -1)
    scored = corpus.scored.reshape(len(corpus.scored), -1)
    dist = torch.cdist(gen, scored)
    nearest = dist.argmin(dim=1)
    planted_rows = torch.tensor([i in corpus.planted for i in corpus.scored_ids])
    to_planted = planted_rows[nearest].float().mean().item()
    close = (dist[:, planted_rows].min(dim=1).values < 1.0).float().mean().item()
    return to_planted, close


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-base", type=int, default=800, help="ordinary digits")
    parser.add_argument("--n-exact", type=int, default=5, help="planted exact-duplicate digits")
    parser.add_argument("--n-near", type=int, default=5, help="planted near-duplicate digits")
    parser.add_argument("--copies", type=int, default=30, help="copies of each planted digit")
    parser.add_argument(
        "--max-shift", type=float, default=0.5, help="near copies: max sub-pixel shift (px)"
    )
    parser.add_argument(
        "--whole-pixel-shift",
        action="store_true",
        help="near copies: np.roll by -1/0/+1 px instead (stress case)",
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--timesteps", default="20,100,300,600", help="comma-separated timesteps to compare"
    )
    parser.add_argument("--draws", type=int, default=2, help="noise draws per timestep")
    parser.add_argument("--probes", type=int, default=2, help="Hutchinson probes per draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="keep the trained model here; a re-run with the same corpus/settings resumes or "
        "reuses it instead of retraining",
    )
    parser.add_argument("--generate", type=int, default=256, help="samples for the memo check")
    args = parser.parse_args(argv)
    timesteps = [int(t) for t in args.timesteps.split(",")]

    print("# Risk signals on a planted-memorization corpus\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}\n"
    )
    corpus = build_corpus(
        args.n_base,
        args.n_exact,
        args.n_near,
        args.copies,
        args.seed,
        max_shift=args.max_shift,
        whole_pixel=args.whole_pixel_shift,
    )
    shift_desc = (
        "whole-pixel shifts" if args.whole_pixel_shift else f"sub-pixel shifts ±{args.max_shift}px"
    )
    print(
        f"corpus: {len(corpus.train)} training images = {args.n_base} digits + "
        f"{args.n_exact} exact x{args.copies} + {args.n_near} near-duplicate x{args.copies} "
        f"({shift_desc} + noise 0.05); "
        f"{len(corpus.scored)} distinct images scored; recall@1% looks at the top "
        f"{math.ceil(0.01 * len(corpus.scored))}\n"
    )
    model = reference_model("digits-8px", seed=args.seed)
    params = sum(p.numel() for p in model.unet.parameters())
    t0 = time.perf_counter()
    result = train(
        model,
        corpus.train,
        TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, log_every=0
        ),
        checkpoint_dir=args.checkpoint_dir,
        progress=sys.stderr.isatty(),
    )
    train_s = time.perf_counter() - t0
    tail = float(np.mean(result.losses[-100:]))
    print(
        f"model: digits-8px, {params:,} params; {args.steps} steps "
        f"({result.start_step} from a checkpoint) in {train_s:.0f} s, "
        f"final loss (mean of last 100) {tail:.4f}"
    )
    if args.generate:
        to_planted, close = reproduction_rate(model, corpus, args.generate, args.seed)
        share = len(corpus.planted) * args.copies / len(corpus.train)
        print(
            f"memorization check: {to_planted:.0%} of {args.generate} generations have a planted "
            f"image as nearest neighbour ({close:.0%} within L2 1.0 of one); planted images are "
            f"{share:.0%} of the training set\n"
        )

    rows = []
    for signal in SIGNALS:
        for t in timesteps:
            spec = ScorerSpec(
                signal=signal,
                timesteps=(t,),
                draws_per_timestep=args.draws,
                probes=args.probes,
                seed=args.seed,
            )
            t1 = time.perf_counter()
            res = score_function(spec)(
                spec.objective(model.scheduler),
                model.unet,
                corpus.scored,
                corpus.scored_ids,
                None,
            )
            secs = time.perf_counter() - t1
            recall, med = recall_and_rank(res.score, corpus.scored_ids, corpus.planted)
            r_exact, _ = recall_and_rank(res.score, corpus.scored_ids, corpus.exact)
            r_near, _ = recall_and_rank(res.score, corpus.scored_ids, corpus.near)
            default = get_scorer(signal).default_timesteps == (t,)
            rows.append((signal, t, recall, r_exact, r_near, med, secs, default))
            print(f"  scored {signal} t={t}: recall@1% {recall:.2f} ({secs:.1f} s)", flush=True)
    base = next(r[6] for r in rows if r[0] == "loss")
    print(
        "\n| signal | t | recall@1% | exact dups | near dups | median planted rank | "
        "seconds | cost vs loss |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for signal, t, recall, r_exact, r_near, med, secs, default in sorted(rows, key=lambda r: r[7]):
        mark = " (default)" if default else ""
        print(
            f"| {signal}{mark} | {t} | {recall:.2f} | {r_exact:.2f} | {r_near:.2f} | "
            f"{med:.0f} / {len(corpus.scored)} | {secs:.1f} | {secs / base:.1f}x |"
        )
    print(
        "\nexact/near columns: recall@1% computed on that half of the planted set alone "
        "(same top-k window)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
