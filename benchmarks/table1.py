"""Seed 000's Table 1 at small scale: prune the same budget by each method, mitigate, measure.

Corpus (real 8×8 scikit-learn digits; ``build_corpus`` of ``benchmarks/risk_signals.py`` plus a
third kind of secret), so that hashing alone cannot find every planted image:

* exact duplicates: ``--n-exact`` digits, each present ``--copies`` times byte-identically
  (an exact-hash group: the platform's flag step removes a flagged group whole);
* near duplicates: ``--n-near`` digits, each present ``--copies`` times with a sub-pixel shift
  (±0.5 px) and noise, so no two copies share bytes (each copy is its own distinct image);
* unique but overtrained: ``--n-unique`` digits present ONCE in the dataset, but the training
  recipe's second phase (``--overtrain-steps`` steps) trains on the dataset plus
  ``--overtrain-passes`` extra copies of each, as a fine-tuning stage on a favoured subset
  would. No hash, exact or perceptual, finds them; only the model's behaviour does.

The reference model (``digits-8px`` DDPM) is trained with that two-phase recipe. Every method
scores the distinct training images (one per exact group: its first copy; every near copy; every
other image) and the platform's flag step (:func:`diffcurate.curation.flag.select_removals`)
takes the same budget of distinct images from each: by default exactly as many as there are
planted distinct images (an oracle-sized budget, so that a perfect ranking removes exactly the
planted set; ``--budget`` sets a fraction instead). Removal expands exact groups to all their
copies. Methods:

* ``none`` (no pruning: the reference itself for the fine-tune rows; for the retrain rows the
  same retrain recipe and seed on every sample, the control that isolates pruning from
  retraining noise), ``random`` (seeded keyed uniform scores);
* ``pixel-knn``: the ``clip-knn`` baseline's near-duplicate counting rule on centred-pixel
  embeddings (no CLIP weights can be downloaded here);
* ``global-hessian`` (seed 000 §4: minibatch Hessian trace thresholding), ``trace`` (seed 000's
  layer-wise GGN trace), ``divergence`` (diffcurate's default risk signal);
* ``ekfac`` (self-influence), ``bif`` (posterior loss variance);
* ``dmin``: DMin is an attribution method with no risk mode, so it prunes by attribution of the
  reference model's own generations: each training image's risk is its largest DMin score
  (Σ_t sketch inner product of normalised gradients) over ``--dmin-queries`` generations, i.e.
  "some generation is explained by this image above all others". That is how a team would use
  attribution to find what a model regurgitates.

Mitigation, for every pruned set: ``finetune`` (seed 000 §3.4: 1 epoch at lr 2e-6 from the
reference weights) and ``retrain`` (the same two-phase recipe from a fresh initialisation on the
kept samples; kept unique-overtrained images stay overtrained).

Measurement (:func:`diffcurate.curation.measure.measure_model`): Mem% = share of the planted
secrets (exact originals, the clean originals of the near groups, the unique images) within
tiled-L2 τ of some generation, τ calibrated once on the reference model at ``--fpr`` false
positives on held-out digits and reused for every candidate; FD and KID on random-projection
pixel features against the held-out digits. Compute time = scoring time of the method
(dataset-level state included). Standard errors: over ``--seeds`` (each seed retrains the
reference, rescores and remitigates); with one seed, the binomial standard error of Mem% over the
secrets.

Output: a markdown table (stdout, and ``--out DIR``/table1.md), a CSV of every row and a PNG
plot (Mem% vs FD per method and mitigation).

Run:  .venv/bin/python benchmarks/table1.py                   (about 40 min on 2 CPU cores)
      .venv/bin/python benchmarks/table1.py --steps 200 --overtrain-steps 50 --generations 64
        --methods none,random,trace --fit-size 64               (smoke run, a few minutes)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcurate.curation.flag import FlagPolicy, select_removals
from diffcurate.curation.measure import MeasureConfig, measure_model
from diffcurate.flows.score import shards_of
from diffcurate.influence.dmin import attribution_scores
from diffcurate.influence.objective import ScoreResult
from diffcurate.influence.registry import (
    BIFOptions,
    DMinOptions,
    EmbeddingState,
    FitSet,
    GlobalHessianOptions,
    ScorerSpec,
    batch_units,
    fit_sample,
    prepare_state,
    score_function,
    score_keys,
    sketch_function,
)
from diffcurate.mitigation import MitigationConfig, fresh_copy, mitigate
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.reference import reference_model
from diffcurate.models.sample import generate
from diffcurate.models.train import TrainConfig, train
from risk_signals import build_corpus

CONTROL = "none"
"""The no-pruning control row (not a scorer): the reference, or the recipe on every sample."""
METHODS = (
    CONTROL,
    "random",
    "pixel-knn",
    "global-hessian",
    "trace",
    "divergence",
    "ekfac",
    "dmin",
    "bif",
)
MITIGATIONS = ("finetune", "retrain")


@dataclass(frozen=True)
class Table1Corpus:
    """Training samples with keys, their exact groups, the secrets and held-out digits."""

    train: torch.Tensor  # [N, 1, 8, 8] in [-1, 1]
    keys: list[str]
    group_of: dict[str, str]  # exact-duplicate copies -> their group's first key
    overtrained: list[str]  # keys the recipe's second phase repeats
    secrets: torch.Tensor  # [S, 1, 8, 8]
    secret_ids: list[str]
    secret_kind: dict[str, str]  # exact | near | unique
    planted: set[str]  # distinct training images that are planted (reps of exact groups)
    heldout: torch.Tensor

    @property
    def distinct(self) -> list[str]:
        """One key per distinct image (exact groups collapse to their first copy)."""
        return [k for k in self.keys if self.group_of.get(k, k) == k]

    def rows(self, keys: list[str]) -> torch.Tensor:
        index = {k: i for i, k in enumerate(self.keys)}
        return self.train[[index[k] for k in keys]]


def build_table1_corpus(args: argparse.Namespace, seed: int) -> Table1Corpus:
    base = build_corpus(args.n_base, args.n_exact, args.n_near, args.copies, seed)
    digits = load_digits().images.astype(np.float32) / 8.0 - 1.0
    # build_corpus's first draw from this generator is its permutation: the same order here.
    order = np.random.default_rng(seed).permutation(len(digits))
    used = args.n_base + args.n_exact + args.n_near
    assert [f"digit-{i}" for i in order[:used]] == base.scored_ids
    unique_idx = order[used : used + args.n_unique]
    held_idx = order[used + args.n_unique : used + args.n_unique + args.n_heldout]
    if len(held_idx) < args.n_heldout:
        raise SystemExit(f"only {len(held_idx)} digits left for the held-out set")
    keys = list(base.scored_ids[: args.n_base])
    group_of: dict[str, str] = {}
    near_keys: list[str] = []
    for name in base.scored_ids[args.n_base : args.n_base + args.n_exact]:
        copies = [name] + [f"{name}/copy-{c}" for c in range(1, args.copies)]
        keys += copies
        group_of.update({c: name for c in copies})
    for name in base.scored_ids[args.n_base + args.n_exact :]:
        copies = [name] + [f"{name}/copy-{c}" for c in range(1, args.copies)]
        keys += copies
        near_keys += copies
    unique_keys = [f"digit-{i}" for i in unique_idx]
    keys += unique_keys
    train_images = torch.cat([base.train, torch.from_numpy(digits[unique_idx][:, None])])
    assert len(keys) == len(train_images) == len(set(keys))
    secret_idx = [*order[args.n_base : used], *unique_idx]
    kind = {f"digit-{i}": "exact" for i in order[args.n_base : args.n_base + args.n_exact]}
    kind |= {f"digit-{i}": "near" for i in order[args.n_base + args.n_exact : used]}
    kind |= {k: "unique" for k in unique_keys}
    return Table1Corpus(
        train=train_images,
        keys=keys,
        group_of=group_of,
        overtrained=unique_keys,
        secrets=torch.from_numpy(digits[secret_idx][:, None]),
        secret_ids=[f"digit-{i}" for i in secret_idx],
        secret_kind=kind,
        planted=set(base.exact) | set(near_keys) | set(unique_keys),
        heldout=torch.from_numpy(digits[held_idx][:, None]),
    )


def train_recipe(
    model: DiffusionModel, corpus: Table1Corpus, kept: list[str], args, seed: int
) -> float:
    """The two-phase recipe on the kept samples (in place); returns seconds."""
    t0 = time.perf_counter()
    images = corpus.rows(kept)
    cfg = dict(batch_size=args.batch_size, lr=args.lr, log_every=0, device=args.device)
    train(model, images, TrainConfig(steps=args.steps, seed=seed, **cfg), progress=False)
    extra = [k for k in corpus.overtrained if k in set(kept)]
    if args.overtrain_steps and extra:
        phase2 = torch.cat([images, corpus.rows(extra).repeat(args.overtrain_passes, 1, 1, 1)])
        train(model, phase2, TrainConfig(steps=args.overtrain_steps, seed=seed + 1, **cfg),
              progress=False)  # fmt: skip
    return time.perf_counter() - t0


def spec_for(method: str, args, seed: int) -> ScorerSpec:
    signal = {"pixel-knn": "clip-knn"}.get(method, method)
    return ScorerSpec(
        signal=signal,
        seed=seed,
        draws_per_timestep=args.draws,
        probes=args.probes,
        fit_size=args.fit_size,
        bif=BIFOptions(chains=args.bif_chains, draws=args.bif_draws, batch_size=args.bif_batch),
        global_hessian=GlobalHessianOptions(probes=args.hessian_probes),
        dmin=DMinOptions(sketch_dim=args.sketch_dim, n_timesteps=args.dmin_timesteps),
        device=args.device,
    )


def method_scores(
    method: str, model: DiffusionModel, corpus: Table1Corpus, args, seed: int
) -> np.ndarray:
    """Risk scores of the distinct training images (higher = riskier)."""
    ids = corpus.distinct
    spec = spec_for(method, args, seed)
    objective = spec.objective(model.scheduler) if spec.uses_model else None
    if spec.scorer.output == "sketches":
        sketch = sketch_function(spec)
        parts = shards_of(batch_units(ids, spec), args.shard_size)
        train_sk = torch.cat([sketch(objective, model.unet, corpus.rows(p), p) for p in parts])
        queries = generate(model, args.dmin_queries, seed=10_000 + seed,
                           num_inference_steps=args.inference_steps,
                           device=args.device)  # fmt: skip
        q_keys = [f"generation-{i}" for i in range(len(queries))]
        q_sk = sketch(objective, model.unet, queries, q_keys)
        return attribution_scores(q_sk, train_sk).max(dim=0).values.numpy()
    with tempfile.TemporaryDirectory(prefix="table1-") as cache:
        fit = embeddings = None
        if spec.scorer.needs.fit_set:
            fit_ids = fit_sample(corpus.keys, spec.fit_size, spec.seed)
            fit = FitSet(images=corpus.rows(fit_ids), keys=tuple(fit_ids),
                         n_dataset=len(corpus.keys))  # fmt: skip
        if spec.scorer.needs.embeddings:
            flat = corpus.train.reshape(len(corpus.keys), -1).numpy().astype(np.float64)
            embeddings = EmbeddingState(reference_keys=tuple(corpus.keys),
                                        reference=flat - flat.mean(axis=0))  # fmt: skip
        unet = model.unet if spec.uses_model else None
        state = prepare_state(spec, objective, unet, fit, cache, embeddings)
        parts = []
        for part in shards_of(batch_units(ids, spec), args.shard_size):
            if spec.uses_model:
                fn = score_function(spec, state)
                parts.append(fn(objective, model.unet, corpus.rows(part), part))
            else:
                parts.append(score_keys(spec, part, state))
    result = ScoreResult.concat(parts)
    by_id = dict(zip(result.sample_keys, result.score, strict=True))
    return np.asarray([by_id[i] for i in ids], dtype=np.float64)


@dataclass
class Row:
    seed: int
    method: str
    mitigation: str
    removed_images: int = 0
    removed_samples: int = 0
    planted_recall: float = float("nan")
    mem: float = float("nan")
    mem_by_kind: dict[str, float] = field(default_factory=dict)
    fd: float = float("nan")
    kid: float = float("nan")
    score_seconds: float = 0.0
    mitigate_seconds: float = 0.0


def measure(model, corpus, args, seed, tau=None):
    config = MeasureConfig(
        generations=args.generations, inference_steps=args.inference_steps, seed=seed,
        calibrate_fpr=args.fpr, device=args.device,
    )  # fmt: skip
    return measure_model(model, corpus.secrets, corpus.secret_ids, corpus.heldout, config,
                         tau=tau, calibration_images=corpus.heldout)  # fmt: skip


def fill(row: Row, m, corpus: Table1Corpus) -> Row:
    row.mem = m.mem.mem_percent
    for kind in ("exact", "near", "unique"):
        hits = [s.reconstructed for s in m.mem.secrets if corpus.secret_kind[s.secret_id] == kind]
        row.mem_by_kind[kind] = 100.0 * float(np.mean(hits)) if hits else float("nan")
    row.fd, row.kid = m.fd, m.kid.mean
    return row


def run_seed(args, seed: int, log, rows: list[Row], flush) -> None:
    """Append one seed's rows to ``rows``, calling ``flush()`` after each (partial results)."""
    torch.manual_seed(seed)
    corpus = build_table1_corpus(args, seed)
    reference = reference_model("digits-8px", seed=seed)
    secs = train_recipe(reference, corpus, corpus.keys, args, seed)
    before = measure(reference, corpus, args, seed)
    tau = before.calibration.tau if before.calibration else None
    log(f"seed {seed}: reference trained in {secs:.0f} s; tau {tau:.4f}; Mem% "
        f"{before.mem.mem_percent:.1f}, FD {before.fd:.3f}")  # fmt: skip
    distinct = corpus.distinct
    planted_distinct = [k for k in distinct if k in corpus.planted]
    fraction = args.budget or len(planted_distinct) / len(distinct)
    # No pruning: the reference itself (fine-tuning on everything at lr 2e-6 leaves it as it
    # is; unlearning nothing changes nothing) and, as the retrain rows' control, the same
    # retrain recipe on every sample.
    for mitigation in [m for m in args.mitigations if m != "retrain"]:
        rows.append(fill(Row(seed, CONTROL, mitigation), before, corpus))
    if "retrain" in args.mitigations:
        control = fresh_copy(reference, seed + 1)
        secs = train_recipe(control, corpus, corpus.keys, args, seed + 1)
        rows.append(fill(Row(seed, CONTROL, "retrain", mitigate_seconds=secs),
                         measure(control, corpus, args, seed, tau=tau), corpus))  # fmt: skip
        log(f"seed {seed}: retrain control (no pruning) Mem% {rows[-1].mem:.1f}, "
            f"FD {rows[-1].fd:.3f}")  # fmt: skip
    flush()
    for method in [m for m in args.methods if m != CONTROL]:
        t0 = time.perf_counter()
        scores = method_scores(method, reference, corpus, args, seed)
        score_s = time.perf_counter() - t0
        flag = select_removals(distinct, scores, policy=FlagPolicy(fraction=fraction))
        flagged = set(flag.flagged_ids)
        kept = [k for k in corpus.keys if corpus.group_of.get(k, k) not in flagged]
        recall = len(flagged & set(planted_distinct)) / len(planted_distinct)
        removed = [k for k in corpus.keys if corpus.group_of.get(k, k) in flagged]
        for mitigation in args.mitigations:
            t1 = time.perf_counter()
            if mitigation == "retrain":
                candidate = fresh_copy(reference, seed + 1)
                train_recipe(candidate, corpus, kept, args, seed + 1)
            elif mitigation == "finetune":  # seed 000 §3.4: 1 epoch at lr 2e-6
                config = MitigationConfig(
                    method="finetune", epochs=1, lr=2e-6, seed=seed, device=args.device
                )
                candidate, _ = mitigate(reference, corpus.rows(kept), config)
            else:  # any other registered method at its measured defaults
                config = MitigationConfig(method=mitigation, seed=seed, device=args.device)
                candidate, _ = mitigate(
                    reference, corpus.rows(kept), config, removed_images=corpus.rows(removed)
                )
            row = Row(seed, method, mitigation, len(flagged), len(corpus.keys) - len(kept),
                      recall, score_seconds=score_s,
                      mitigate_seconds=time.perf_counter() - t1)  # fmt: skip
            rows.append(fill(row, measure(candidate, corpus, args, seed, tau=tau), corpus))
            flush()
            log(f"seed {seed}: {method:>14} + {mitigation:<8} recall {recall:.2f}  Mem% "
                f"{row.mem:5.1f}  FD {row.fd:.3f}  (score {score_s:.0f} s, mitigate "
                f"{row.mitigate_seconds:.0f} s)")  # fmt: skip


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan)


def table(rows: list[Row], n_secrets: int) -> str:
    lines = [
        "| method | mitigation | planted found | Mem% (± SE) | exact / near / unique Mem% "
        "| Mem% reduction vs none | FD (± SE) | FD change vs none | KID | score s | "
        "score time vs trace |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r.method, r.mitigation), []).append(r)
    trace_s = mean_se([r.score_seconds for r in by.get(("trace", "retrain"), [])] or [math.nan])[0]
    for (method, mitigation), rs in by.items():
        mem, mem_se = mean_se([r.mem for r in rs])
        if len(rs) == 1:  # binomial SE over the secrets
            p = mem / 100
            mem_se = 100 * math.sqrt(p * (1 - p) / n_secrets)
        fd, fd_se = mean_se([r.fd for r in rs])
        none = by[(CONTROL, mitigation)]
        mem0, fd0 = mean_se([r.mem for r in none])[0], mean_se([r.fd for r in none])[0]
        red = 100 * (mem0 - mem) / mem0 if mem0 > 0 else math.nan
        kinds = " / ".join(f"{np.mean([r.mem_by_kind[k] for r in rs]):.0f}"
                           for k in ("exact", "near", "unique"))  # fmt: skip
        score_s = np.mean([r.score_seconds for r in rs])
        recall = np.mean([r.planted_recall for r in rs]) if method != CONTROL else math.nan
        lines.append(
            f"| {method} | {mitigation} | {'-' if method == 'none' else f'{recall:.2f}'} | "
            f"{mem:.1f} ± {mem_se:.1f} | {kinds} | "
            f"{'-' if method == 'none' or math.isnan(red) else f'{red:.0f}%'} | "
            f"{fd:.3f}{'' if math.isnan(fd_se) else f' ± {fd_se:.3f}'} | "
            f"{'-' if method == 'none' else f'{100 * (fd - fd0) / fd0:+.1f}%'} | "
            f"{np.mean([r.kid for r in rs]):.3f} | "
            f"{'-' if method == 'none' else f'{score_s:.1f}'} | "
            f"{'-' if method == 'none' or math.isnan(trace_s) else f'{score_s / trace_s:.2f}x'} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "method", "mitigation", "removed_images", "removed_samples",
                    "planted_recall", "mem_percent", "mem_exact", "mem_near", "mem_unique", "fd",
                    "kid", "score_seconds", "mitigate_seconds"])  # fmt: skip
        for r in rows:
            w.writerow([r.seed, r.method, r.mitigation, r.removed_images, r.removed_samples,
                        f"{r.planted_recall:.4f}", f"{r.mem:.2f}",
                        *(f"{r.mem_by_kind[k]:.2f}" for k in ("exact", "near", "unique")),
                        f"{r.fd:.5f}", f"{r.kid:.5f}", f"{r.score_seconds:.2f}",
                        f"{r.mitigate_seconds:.2f}"])  # fmt: skip


def read_csv(path: Path) -> list[Row]:
    """Rows written by :func:`write_csv`."""
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append(Row(
                int(r["seed"]), r["method"], r["mitigation"], int(r["removed_images"]),
                int(r["removed_samples"]), float(r["planted_recall"]), float(r["mem_percent"]),
                {k: float(r[f"mem_{k}"]) for k in ("exact", "near", "unique")},
                float(r["fd"]), float(r["kid"]), float(r["score_seconds"]),
                float(r["mitigate_seconds"]),
            ))  # fmt: skip
    return rows


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len({r.mitigation for r in rows})
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, mitigation in zip(axes, dict.fromkeys(r.mitigation for r in rows), strict=False):
        for method in dict.fromkeys(r.method for r in rows):
            rs = [r for r in rows if r.method == method and r.mitigation == mitigation]
            if rs:
                ax.scatter(np.mean([r.fd for r in rs]), np.mean([r.mem for r in rs]), s=40)
                ax.annotate(method, (np.mean([r.fd for r in rs]), np.mean([r.mem for r in rs])),
                            fontsize=8, xytext=(4, 3), textcoords="offset points")  # fmt: skip
        ax.set_title(f"mitigation: {mitigation}")
        ax.set_xlabel("FD vs held-out digits (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Mem% of planted secrets (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """Corpus, recipe, scoring and measurement options (shared with ``mitigation.py``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--n-base", type=int, default=800, help="ordinary digits")
    add("--n-exact", type=int, default=5, help="planted exact-duplicate digits")
    add("--n-near", type=int, default=5, help="planted near-duplicate digits")
    add("--n-unique", type=int, default=5, help="planted unique-but-overtrained digits")
    add("--copies", type=int, default=30, help="copies per duplicated digit; overtraining passes")
    add("--n-heldout", type=int, default=300, help="held-out digits for FD/KID and tau")
    add("--steps", type=int, default=1500, help="phase-1 training steps (reference and retrain)")
    add("--overtrain-steps", type=int, default=400, help="phase-2 steps (unique images repeated)")
    add("--overtrain-passes", type=int, default=60, help="phase 2: extra copies of each unique")
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=1e-3)
    add("--seeds", type=int, default=1, help="repeat everything with seeds 0..N-1")
    add(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ",".join(METHODS),
    )
    add(
        "--budget",
        type=float,
        default=None,
        help="fraction of distinct images each method prunes [the planted share: oracle size]",
    )
    add("--generations", type=int, default=512, help="samples per model for Mem%%/FD/KID")
    add("--inference-steps", type=int, default=50, help="DDIM steps per sample")
    add("--fpr", type=float, default=0.05, help="tau calibrated to this held-out FPR")
    add("--draws", type=int, default=2, help="noise draws per timestep (trace, divergence, ...)")
    add("--probes", type=int, default=2, help="Hutchinson probes per draw")
    add("--fit-size", type=int, default=512, help="ekfac/bif fit set")
    add("--bif-chains", type=int, default=4)
    add("--bif-draws", type=int, default=25)
    add("--bif-batch", type=int, default=256)
    add("--hessian-probes", type=int, default=16)
    add("--sketch-dim", type=int, default=4096, help="dmin sketch dimension v")
    add("--dmin-timesteps", type=int, default=5, help="dmin: evenly spaced timesteps")
    add("--dmin-queries", type=int, default=128, help="dmin: generations attributed")
    add("--shard-size", type=int, default=256)
    add("--threads", type=int, default=torch.get_num_threads())
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--out", default="workspace/benchmarks/table1", help="where table1.md/.csv/.png go")
    add(
        "--render",
        nargs="+",
        metavar="CSV",
        help="train nothing: render the table, CSV and plot from these runs' table1.csv files",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument(
        "--mitigations",
        default=",".join(MITIGATIONS),
        help="comma-separated: finetune (seed 000's recipe), retrain (the recipe from scratch) "
        "and any other registered mitigation at its defaults (erasediff, layer-finetune, ...)",
    )
    args = parser.parse_args(argv)
    args.mitigations = [m for m in args.mitigations.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if CONTROL not in args.methods:
        args.methods.insert(0, CONTROL)
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.set_verbosity_error()  # fresh_copy's dtype cast notice
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # fmt: skip
    header = [
        "# Table 1 at small scale: prune, mitigate, measure\n",
        f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`",
        f"commit: {commit}",
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}, device {args.device}",
    ]
    print("\n".join(header), flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    if args.render:  # a table from earlier runs' rows (e.g. methods split over processes)
        seen = set()
        for path in args.render:  # the same (seed, method, mitigation) twice: the first wins
            for r in read_csv(Path(path)):
                if (r.seed, r.method, r.mitigation) not in seen:
                    seen.add((r.seed, r.method, r.mitigation))
                    rows.append(r)
        print(f"rows from: {', '.join(args.render)}")
    for seed in range(0 if args.render else args.seeds):
        run_seed(args, seed, lambda s: print("  " + s, file=sys.stderr, flush=True), rows,
                 lambda: write_csv(rows, out / "table1.csv"))  # fmt: skip
    seeds = len({r.seed for r in rows})
    c = build_table1_corpus(args, 0)
    n_distinct = len(c.distinct)
    n_planted = len([k for k in c.distinct if k in c.planted])
    budget = args.budget or n_planted / n_distinct
    body = [
        f"\ncorpus: {len(c.keys)} training samples = {args.n_base} digits + {args.n_exact} exact "
        f"x{args.copies} + {args.n_near} near-duplicate x{args.copies} + {args.n_unique} unique "
        f"overtrained (phase 2: {args.overtrain_steps} steps, {args.overtrain_passes} extra "
        "copies of each); "
        f"{n_distinct} distinct images, {n_planted} of them planted; {len(c.secret_ids)} "
        f"secrets; {args.n_heldout} held-out digits",
        f"model: digits-8px DDPM, {args.steps} + {args.overtrain_steps} steps (batch "
        f"{args.batch_size}, lr {args.lr:g}); {seeds} seed(s)",
        f"budget: {budget:.4f} of distinct images = {math.ceil(round(budget * n_distinct, 9))} "
        "per method (exact groups removed whole)",
        f"measure: {args.generations} generations x {args.inference_steps} DDIM steps; tau "
        f"calibrated on the reference at {args.fpr:g} held-out FPR (tiled L2), reused for "
        "every candidate; FD/KID on random-projection pixel features vs the held-out digits\n",
        table(rows, len(c.secret_ids)),
        "\nplanted found = share of the planted distinct images in the pruned set. Mem% SE: "
        + ("over seeds" if seeds > 1 else "binomial over the secrets (one seed)")
        + ". score s = the method's scoring time incl. dataset-level state (fit sets, factors, "
        f"chains, sketches). Wall time of this process {time.perf_counter() - started:.0f} s.",
    ]
    print("\n".join(body), flush=True)
    (out / "table1.md").write_text("\n".join(header + body) + "\n")
    write_csv(rows, out / "table1.csv")
    plot(rows, out / "table1.png")
    print(f"\nwrote {out / 'table1.md'}, {out / 'table1.csv'}, {out / 'table1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
