"""Every risk scorer side by side on one planted-memorization corpus and one reference model.

Corpus: ``build_corpus`` of ``benchmarks/risk_signals.py`` (real 8×8 scikit-learn digits,
``--n-exact`` exactly and ``--n-near`` near-duplicated digits with ``--copies`` copies each among
``--n-base`` ordinary digits). Model: the ``digits-8px`` reference DDPM trained ``--steps`` steps
on it, cached under a printed directory (reuse with ``--model DIR``).

The platform holds the TRAINING set (copies included, each with its own key); as in
``risk_signals.py`` the scored set is one entry per distinct image (each exact group's image and
each near group's first training copy, under that training sample's key). Dataset-level state is
built from the training set exactly as the score flow builds it from a dataset
(:func:`diffcurate.influence.registry.prepare_state`): the seeded fit set of ``--fit-size``
training samples for the EK-FAC curvature, the TRAK kernel and the BIF SGLD set; the CLIP-kNN
reference is every training sample. ``global-hessian`` forms its minibatches over the whole
scored set. The scored set is processed in shards of ``--shard-size`` cut as the flow cuts them
(``batch_units``: whole minibatches for ``global-hessian``).

Per scorer: recall@1% of the planted images (share of them among the top ceil(1%) of the
scored set; expected value under random tie-breaking, see
:mod:`diffcurate.metrics.planted_recall`), their median mid-rank, wall time (dataset-level
state included) as a ratio to ``trace``'s, and peak memory. Each scorer runs in a fresh child
process (multiprocessing "spawn") that loads the cached model and rebuilds the corpus, then
records ``ru_maxrss``; the reported memory is ru_maxrss after scoring minus ru_maxrss after
that setup (the resident-set high-water mark the scorer added; resource.getrusage, Linux KiB).
tracemalloc is not used: it does not see torch's tensor allocations.

``clip-knn``: no CLIP weights can be downloaded here, so its embeddings are a stand-in: the
mean-centred pixel vector of each image (64-d). The row is the near-duplicate counting rule on
that embedding, not CLIP's.

Not scored: ``cond-gap`` (text-conditional models only; this model is unconditional) and ``dmin``
(attribution only, no risk mode).

Run:  .venv/bin/python benchmarks/scorers.py --steps 1500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffcurate.flows.score import shards_of
from diffcurate.influence.objective import ScoreResult
from diffcurate.influence.registry import (
    BIFOptions,
    EmbeddingState,
    FitSet,
    GlobalHessianOptions,
    ScorerSpec,
    TRAKOptions,
    batch_units,
    fit_sample,
    get_scorer,
    prepare_state,
    score_function,
    score_keys,
    scorer_names,
)
from diffcurate.models.diffusion import load_diffusion_model
from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, train
from risk_signals import build_corpus, recall_and_rank

SCORERS = (
    "trace",
    "divergence",
    "loss",
    "ekfac",
    "bif",
    "trak",
    "d-trak",
    "global-hessian",
    "random",
    "clip-knn",
)
SKIPPED = {
    "cond-gap": "text-conditional models only",
}
assert set(SCORERS) | set(SKIPPED) == set(scorer_names(risk=True))


def corpus_keys(args: argparse.Namespace):
    """The corpus with a key per TRAINING sample; scored ids are the keys of their samples."""
    corpus = build_corpus(args.n_base, args.n_exact, args.n_near, args.copies, args.seed)
    n_base = args.n_base
    keys = list(corpus.scored_ids[:n_base])
    for name in corpus.scored_ids[n_base : n_base + args.n_exact]:
        keys += [name] + [f"{name}/copy-{c}" for c in range(1, args.copies)]
    for name in corpus.scored_ids[n_base + args.n_exact :]:
        keys += [name] + [f"{name}/copy-{c}" for c in range(1, args.copies)]
    assert len(keys) == len(corpus.train) == len(set(keys))
    # Scored near reps are the first training copy of each near group, under that copy's key.
    row = {k: i for i, k in enumerate(keys)}
    assert all(
        torch.equal(corpus.train[row[k]], corpus.scored[j]) for j, k in enumerate(corpus.scored_ids)
    )
    return corpus, keys


def spec_for(signal: str, args: argparse.Namespace) -> ScorerSpec:
    signal, _, t = signal.partition("@")
    return ScorerSpec(
        signal=signal,
        timesteps=(int(t),) if t else None,
        seed=args.seed,
        draws_per_timestep=args.draws,
        probes=args.probes,
        fit_size={"ekfac": args.ekfac_fit_size}.get(signal) or args.fit_size,
        bif=BIFOptions(chains=args.bif_chains, draws=args.bif_draws, batch_size=args.bif_batch),
        trak=TRAKOptions(proj_dim=args.proj_dim, projection_cache=args.projection_cache),
        global_hessian=GlobalHessianOptions(probes=args.hessian_probes),
    )


def _score(signal: str, args: argparse.Namespace, model_dir: str) -> dict:
    """Child process: set up, then score and measure one scorer."""
    torch.set_num_threads(args.threads)
    model = load_diffusion_model(Path(model_dir))
    corpus, keys = corpus_keys(args)
    spec = spec_for(signal, args)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scorers-") as cache:
        objective = None if not spec.uses_model else spec.objective(model.scheduler)
        fit = embeddings = None
        if spec.scorer.needs.fit_set:
            fit_ids = fit_sample(keys, spec.fit_size, spec.seed)
            row = {k: i for i, k in enumerate(keys)}
            fit = FitSet(
                images=corpus.train[[row[k] for k in fit_ids]],
                keys=tuple(fit_ids),
                n_dataset=len(keys),
            )
        if spec.scorer.needs.embeddings:
            flat = corpus.train.reshape(len(keys), -1).numpy().astype(np.float64)
            embeddings = EmbeddingState(
                reference_keys=tuple(keys), reference=flat - flat.mean(axis=0)
            )
        state = prepare_state(spec, objective, model.unet, fit, cache, embeddings)
        state_s = time.perf_counter() - started
        parts = []
        row = {k: i for i, k in enumerate(corpus.scored_ids)}
        # Shards as the flow cuts them (whole global minibatches for global-hessian).
        for ids in shards_of(batch_units(corpus.scored_ids, spec), args.shard_size):
            if spec.uses_model:
                fn = score_function(spec, state)
                parts.append(fn(objective, model.unet, corpus.scored[[row[i] for i in ids]], ids))
            else:
                parts.append(score_keys(spec, ids, state))
    seconds = time.perf_counter() - started
    result = ScoreResult.concat(parts)
    by_id = dict(zip(result.sample_keys, result.score, strict=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "signal": signal,
        "scores": [float(by_id[i]) for i in corpus.scored_ids],
        "method": result.method,
        "timesteps": list(spec.effective_timesteps),
        "seconds": seconds,
        "state_seconds": state_s,
        "rss_delta_mib": (peak - base_rss) / 1024,
        "rss_setup_mib": base_rss / 1024,
    }


def _child(signal: str, args: argparse.Namespace, model_dir: str, queue: mp.Queue) -> None:
    try:
        queue.put(_score(signal, args, model_dir))
    except BaseException as err:  # report, never hang the parent
        queue.put({"signal": signal, "error": repr(err)})


def trained_model(args: argparse.Namespace, corpus) -> Path:
    """The reference model: ``--model`` as given, else trained (or resumed) into the cache."""
    if args.model is not None:
        return Path(args.model)
    tag = hashlib.sha256(
        json.dumps(
            [args.n_base, args.n_exact, args.n_near, args.copies, args.seed, args.batch_size,
             args.lr, args.steps]
        ).encode()
    ).hexdigest()[:10]  # fmt: skip
    root = Path(args.cache_dir) / f"digits-8px-{args.steps}steps-{tag}"
    model = reference_model("digits-8px", seed=args.seed)
    t0 = time.perf_counter()
    result = train(
        model,
        corpus.train,
        TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    log_every=0, checkpoint_every=500),
        checkpoint_dir=root,
        progress=sys.stderr.isatty(),
    )  # fmt: skip
    tail = float(np.mean(result.losses[-100:]))
    ran = "trained" if result.start_step < result.final_step else "reused"
    print(
        f"model: digits-8px, {sum(p.numel() for p in model.unet.parameters()):,} params, "
        f"{ran} {args.steps} steps ({time.perf_counter() - t0:.0f} s), final loss (mean of last "
        f"100) {tail:.4f}; cached at `{result.checkpoint}` (reuse with --model)"
    )
    assert result.checkpoint is not None
    return result.checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-base", type=int, default=800, help="ordinary digits")
    parser.add_argument("--n-exact", type=int, default=5, help="planted exact-duplicate digits")
    parser.add_argument("--n-near", type=int, default=5, help="planted near-duplicate digits")
    parser.add_argument("--copies", type=int, default=30, help="copies of each planted digit")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="reuse this saved model directory (skips training)")
    parser.add_argument(
        "--cache-dir", default="workspace/benchmarks/scorers", help="where trained models go"
    )
    parser.add_argument(
        "--scorers",
        default=",".join(SCORERS),
        help="comma-separated subset; NAME@T scores at timestep T instead of the default",
    )
    parser.add_argument("--draws", type=int, default=2, help="noise draws per timestep")
    parser.add_argument("--probes", type=int, default=2, help="trace/divergence probes per draw")
    parser.add_argument("--fit-size", type=int, default=512, help="ekfac/bif/trak fit set")
    parser.add_argument(
        "--ekfac-fit-size", type=int, default=None, help="ekfac's own fit set [--fit-size]"
    )
    parser.add_argument("--bif-chains", type=int, default=4)
    parser.add_argument("--bif-draws", type=int, default=100, help="recorded draws per chain")
    parser.add_argument("--bif-batch", type=int, default=1024, help="SGLD minibatch")
    parser.add_argument("--proj-dim", type=int, default=2048, help="trak/d-trak projection")
    parser.add_argument(
        "--projection-cache", type=int, default=1 << 26, help="trak: P entries kept in memory"
    )
    parser.add_argument("--hessian-probes", type=int, default=16, help="global-hessian HVPs")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--sweep",
        default="",
        help="comma-separated timesteps: also score each model-based scorer at each of them "
        "(extra rows 'scorer@t'; to choose default timesteps)",
    )
    args = parser.parse_args(argv)
    scorers = [s for s in args.scorers.split(",") if s]
    unknown = {s.partition("@")[0] for s in scorers} - set(SCORERS)
    if unknown:
        parser.error(f"unknown scorers {sorted(unknown)}; choose from {SCORERS}")
    if "trace" not in scorers:
        scorers.insert(0, "trace")  # the time reference
    for t in [int(t) for t in args.sweep.split(",") if t]:
        scorers += [f"{s}@{t}" for s in list(scorers) if "@" not in s and get_scorer(s).needs.model
                    and t not in spec_for(s, args).effective_timesteps]  # fmt: skip

    print("# Risk scorers on a planted-memorization corpus\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}\n"
    )
    corpus, keys = corpus_keys(args)
    k = math.ceil(0.01 * len(corpus.scored_ids))
    print(
        f"corpus: {len(keys)} training images = {args.n_base} digits + {args.n_exact} exact "
        f"x{args.copies} + {args.n_near} near-duplicate x{args.copies} (sub-pixel shifts "
        f"±0.5px + noise 0.05); {len(corpus.scored_ids)} distinct images scored; recall@1% "
        f"looks at the top {k}"
    )
    model_dir = trained_model(args, corpus)
    ek_fit = args.ekfac_fit_size or args.fit_size
    print(
        f"settings: draws {args.draws}/timestep, probes {args.probes}, fit set {args.fit_size} "
        f"of {len(keys)} training samples (ekfac: {ek_fit}), bif {args.bif_chains} chains x "
        f"{args.bif_draws} draws (SGLD minibatch {args.bif_batch}), trak/d-trak "
        f"k={args.proj_dim}, global-hessian {args.hessian_probes} probes per minibatch of 64, "
        f"shards of {args.shard_size}\n"
    )
    ctx = mp.get_context("spawn")
    results = {}
    for signal in scorers:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(signal, args, str(model_dir), queue))
        proc.start()
        res = queue.get()
        proc.join()
        if "error" in res:
            print(f"  {signal}: FAILED {res['error']}", flush=True)
            continue
        scores = np.asarray(res["scores"])
        recall, med = recall_and_rank(scores, corpus.scored_ids, corpus.planted)
        r_exact, _ = recall_and_rank(scores, corpus.scored_ids, corpus.exact)
        r_near, _ = recall_and_rank(scores, corpus.scored_ids, corpus.near)
        res.update(recall=recall, exact=r_exact, near=r_near, median=med)
        results[signal] = res
        print(
            f"  {signal}: recall@1% {recall:.2f}, {res['seconds']:.1f} s "
            f"(state {res['state_seconds']:.1f} s), +{res['rss_delta_mib']:.0f} MiB",
            flush=True,
        )
    base = results["trace"]["seconds"]
    print(
        "\n| scorer | t | recall@1% | exact dups | near dups | median planted rank | "
        "seconds | time vs trace | peak RSS added (MiB) | method |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for signal in scorers:
        if signal not in results:
            print(f"| {signal} | | failed | | | | | | | |")
            continue
        r = results[signal]
        t = ",".join(map(str, r["timesteps"])) or "-"
        print(
            f"| {signal} | {t} | {r['recall']:.2f} | {r['exact']:.2f} | {r['near']:.2f} | "
            f"{r['median']:.0f} / {len(corpus.scored_ids)} | {r['seconds']:.1f} | "
            f"{r['seconds'] / base:.2f}x | {r['rss_delta_mib']:.0f} | {r['method']} |"
        )
    print(
        "\nseconds include each scorer's dataset-level state (fit set, factors, kernel, chains). "
        "Peak RSS added = ru_maxrss after scoring minus after setup (model + corpus loaded, "
        f"about {results['trace']['rss_setup_mib']:.0f} MiB), in a fresh process per scorer. "
        "exact/near columns: recall@1% on that half of the planted set alone (same top-k "
        "window). clip-knn uses centred-pixel stand-in embeddings (no CLIP weights offline). "
        + " ".join(f"Not scored: {s} ({why})." for s, why in SKIPPED.items())
        + " dmin has no risk mode (attribution only)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
