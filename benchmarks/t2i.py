"""The text-to-image loop on the sd-tiny reference pipeline and the photo demo corpus.

Corpus: ``diffcurate demo-corpus --kind photos`` (32×32 crops of scikit-image's photos with
captions; ``--secrets`` exact secrets and ``--near`` near-duplicate secrets, ``--copies`` copies
each, a held-out split). Model: ``sd-tiny`` (VAE + CLIP text encoder + cross-attention UNet)
trained on it exactly as ``diffcurate train --arch sd-tiny`` trains it (VAE first, then the UNet
on cached latents with caption dropout), cached under the workspace (re-runs resume/reuse it).

Part 1, risk scorers: each scorer runs through the platform's score flow on the ingested
dataset (the same code path as ``diffcurate score``; latents come from the cache). The ranking
is over DISTINCT images, as the hygiene run's flag step ranks them: an exact-duplicate group is
one image scored by its riskiest copy, and so is each planted near-duplicate group. Per scorer:
recall@1% of the planted secrets (tie-aware, :mod:`diffcurate.metrics.planted_recall`; the top
ceil(1%) distinct images, so at most that many secrets can be found), recall@P (P = number of
planted secrets), median planted mid-rank, and seconds per sample as a ratio to ``loss``.

Part 2, the hygiene run (``diffcurate run``'s flow): flag with ``--run-scorer``, fine-tune the
kept samples, and gate with the T2I gate: each distinct secret's caption prompted
``--per-secret`` times under guidance ``--guidance``, Mem% under the rule in force (relative
for latent models) with δ calibrated at ``--fpr`` on the held-out images; held-out FPR, FD and
KID before → after.

Run:  .venv/bin/python benchmarks/t2i.py            (about 25 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCORERS = (
    "loss",
    "divergence",
    "trace",
    "cond-gap",
    "ekfac",
    "ekfac@100",
    "ekfac~1e-3",
    "bif",
    "trak",
    "random",
)


def _setup_env(threads: int) -> None:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="t2i-bench-prefect-"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(args: argparse.Namespace, ws: Path) -> tuple[Path, dict]:
    """Corpus, ingest and the trained sd-tiny model (each reused when already there)."""
    from diffcurate.config import ClipSettings, IngestSettings
    from diffcurate.demo.photos import write_photo_corpus
    from diffcurate.flows.ingest import IngestParams, ingest_flow
    from diffcurate.models.reference_training import prepare_reference_training
    from diffcurate.models.train import TrainConfig, latest_checkpoint, train
    from diffcurate.models.vae_train import VAEConfig
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.workspace import Workspace

    corpus = ws / "corpus"
    if not (corpus / "planted.json").is_file():
        write_photo_corpus(
            corpus,
            heldout=args.heldout,
            secrets=args.secrets,
            near_secrets=args.near,
            copies=args.copies,
            seed=args.seed,
        )
    planted = json.loads((corpus / "planted.json").read_text())
    store = LanceStore.open(Workspace(ws))
    for src, name in (
        (corpus / "shards", "photos"),
        (corpus / "heldout" / "shards", "photos-heldout"),
    ):
        if (
            not store.has_table("samples")
            or not store.read("samples", name, columns=["sample_id"]).num_rows
        ):
            ingest_flow(
                IngestParams(
                    source=src,
                    dataset=name,
                    workspace=ws,
                    clip=ClipSettings(),
                    ingest=IngestSettings(),
                    progress=False,
                )
            )
    model_dir = ws / "models" / "photos-sd-tiny"
    t0 = time.perf_counter()
    data = prepare_reference_training(
        store,
        "photos",
        "sd-tiny",
        model_dir,
        seed=args.seed,
        vae=VAEConfig(steps=args.vae_steps, seed=args.seed),
    )
    vae_s = time.perf_counter() - t0
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        caption_dropout=0.1,
        checkpoint_every=1000,
        log_every=0,
    )
    t0 = time.perf_counter()
    result = train(
        data.model,
        data.rows,
        config,
        checkpoint_dir=model_dir / "checkpoints",
        progress=False,
        unconditional=data.unconditional,
    )
    ck = latest_checkpoint(model_dir / "checkpoints")
    assert ck is not None
    tail = result.losses[-100:]
    info = {
        "planted": planted,
        "vae_seconds": vae_s,
        "unet_seconds": time.perf_counter() - t0,
        "n_samples": len(data.sample_ids),
        "final_loss": sum(tail) / len(tail),
        "vae_rmse": None if data.vae is None else data.vae.recon_rmse,
    }
    return ck, info


def spec_for(name: str, args: argparse.Namespace):
    """The spec of a scorer row: ``NAME``, ``NAME@T`` (timestep T) or ``ekfac~D`` (damping D).

    Settings beyond the defaults per scorer: the SGLD minibatch of 256 for ``bif``, the
    projection dimension for ``trak``, two generations along the benchmark's guided trajectory
    for ``cond-gap``.
    """
    from diffcurate.influence.registry import ScorerSpec

    name, _, damping = name.partition("~")
    signal, _, t = name.partition("@")
    overrides = {
        "bif": {"chains": args.bif_chains, "draws": args.bif_draws, "batch_size": 256},
        "trak": {"proj_dim": args.proj_dim},
        "cond-gap": {"generations": 2, "inference_steps": args.inference_steps,
                     "guidance_scale": args.guidance},
    }  # fmt: skip
    settings: dict = {"seed": args.seed, "fit_size": args.fit_size}
    if t:
        settings["timesteps"] = (int(t),)
    if damping:
        settings["damping"] = float(damping)
    return ScorerSpec.from_settings(signal, settings | overrides.get(signal, {}))


def distinct_ranking(store, run_id: str, planted: dict) -> tuple[list[str], list[float], set]:
    """Scores collapsed to distinct images (exact groups, planted near groups); planted reps."""
    from diffcurate.curation.groups import collapse_groups
    from diffcurate.flows.gate_inputs import duplicate_group_of

    table = store.read("scores", columns=["sample_id", "score"], where={"run_id": run_id})
    ids, scores = table.column("sample_id").to_pylist(), table.column("score").to_numpy()
    samples = store.read("samples", "photos", columns=["sample_id", "key"]).to_pylist()
    by_key = {r["key"]: r["sample_id"] for r in samples}
    group_of = duplicate_group_of(store, "photos", "exact")
    planted_groups = {}
    for key in planted["planted_keys"]:
        sid = by_key[key]
        planted_groups[group_of.get(sid, sid)] = key
    for key, copies in (planted.get("near_copies") or {}).items():
        sid = by_key[key]
        for copy in copies:
            group_of[by_key[copy]] = group_of.get(sid, sid)
    collapsed = collapse_groups(ids, scores, group_of)
    reps = collapsed.representatives
    planted_reps = {r for r in reps if group_of.get(r, r) in planted_groups}
    return reps, list(collapsed.scores), planted_reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", default="workspace/benchmarks/t2i")
    parser.add_argument("--secrets", type=int, default=3, help="exact-duplicate secrets")
    parser.add_argument("--near", type=int, default=2, help="near-duplicate secrets")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=3000, help="UNet training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--fit-size", type=int, default=256, help="ekfac/bif/trak fit set")
    parser.add_argument("--bif-chains", type=int, default=2)
    parser.add_argument("--bif-draws", type=int, default=20)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--run-scorer", default="trace", help="scorer of the hygiene run")
    parser.add_argument("--fraction", type=float, default=0.02, help="flag budget")
    parser.add_argument("--per-secret", type=int, default=4, help="generations per secret")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--generations", type=int, default=256, help="utility generations")
    parser.add_argument("--fpr", type=float, default=0.05, help="held-out FPR for δ")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-hygiene", action="store_true", help="only part 1 (the risk scorers)")
    args = parser.parse_args(argv)
    _setup_env(args.threads)

    import numpy as np
    import torch

    from diffcurate.curation.flag import FlagPolicy
    from diffcurate.curation.measure import MeasureConfig
    from diffcurate.flows.hygiene import HygieneParams, hygiene_flow
    from diffcurate.flows.score import ScoreParams, score_flow
    from diffcurate.metrics.planted_recall import (
        expected_recall_at_k,
        planted_recall_and_rank,
        top_k_for_fraction,
    )
    from diffcurate.mitigation import MitigationConfig
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.workspace import Workspace

    ws = Path(args.workspace)
    print("# The text-to-image loop on sd-tiny\n")
    print(f"command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`  ")
    print(f"commit: {_commit()}  ")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"threads {args.threads}\n"
    )
    model_dir, info = build(args, ws)
    planted = info["planted"]
    print(
        f"corpus: {info['n_samples']} training samples, {args.secrets} exact + {args.near} "
        f"near secrets x{args.copies}, {args.heldout} held out; VAE {args.vae_steps} steps "
        f"(RMSE {info['vae_rmse']}), UNet {args.steps} steps batch {args.batch_size} lr "
        f"{args.lr} (final loss {info['final_loss']:.4f}); model {model_dir}\n"
    )

    store = LanceStore.open(Workspace(ws))
    rows = {}
    scorer_rows = [s for s in args.scorers.split(",") if s]
    for signal in scorer_rows:
        spec = spec_for(signal, args)
        t0 = time.perf_counter()
        try:
            summary = score_flow(
                ScoreParams(
                    dataset="photos", model=model_dir, scorer=spec, workspace=ws, progress=False
                )
            )
        except Exception as err:  # a failing scorer is a result to report, not a crash
            print(f"  {signal}: FAILED {type(err).__name__}: {err}", flush=True)
            rows[signal] = {"error": f"{type(err).__name__}: {err}"}
            continue
        seconds = summary.seconds if summary.scored else time.perf_counter() - t0
        reps, scores, planted_reps = distinct_ranking(store, summary.run_id, planted)
        k1 = top_k_for_fraction(len(reps), 0.01)
        r1, med = planted_recall_and_rank(scores, reps, planted_reps)
        rp = expected_recall_at_k(np.asarray(scores), reps, planted_reps, len(planted_reps))
        rows[signal] = {
            "recall1": r1,
            "recallP": rp,
            "median": med,
            "n": len(reps),
            "k1": k1,
            "P": len(planted_reps),
            "seconds": seconds,
            "per_sample": seconds / summary.samples,
            "method": summary.method,
            "t": summary.timesteps,
        }
        print(
            f"  {signal}: recall@1% {r1:.2f}, recall@P {rp:.2f}, median rank {med:.0f}, "
            f"{seconds:.1f} s",
            flush=True,
        )

    base = rows.get("loss", {}).get("per_sample")
    print("\n## Risk scorers (distinct images)\n")
    print(
        "| scorer | t | recall@1% | recall@P | median planted rank | s/sample | vs loss | method |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for signal, r in rows.items():
        if "error" in r:
            print(f"| {signal} | | failed: {r['error'][:80]} | | | | | |")
            continue
        ratio = f"{r['per_sample'] / base:.1f}x" if base else "-"
        print(
            f"| {signal} | {','.join(map(str, r['t'])) or '-'} | {r['recall1']:.2f} | "
            f"{r['recallP']:.2f} | {r['median']:.0f} / {r['n']} | {r['per_sample']:.4f} | "
            f"{ratio} | {r['method']} |"
        )
    some = next((r for r in rows.values() if "error" not in r), None)
    if some:
        print(
            f"\nrecall@1% looks at the top {some['k1']} of {some['n']} distinct images, so "
            f"at most {min(some['k1'], some['P'])} of the {some['P']} planted secrets "
            f"(recall@1% ≤ {min(some['k1'], some['P']) / some['P']:.2f}); recall@P at the "
            f"top {some['P']}."
        )

    if args.no_hygiene:
        return 0
    print("\n## Hygiene run (fine-tune) with the T2I gate\n")
    measure = MeasureConfig(
        generations=args.generations,
        generations_per_secret=args.per_secret,
        inference_steps=args.inference_steps,
        guidance_scale=args.guidance,
        calibrate_fpr=args.fpr,
        seed=args.seed,
    )
    params = HygieneParams(
        dataset="photos",
        model=model_dir,
        workspace=ws,
        scorer=spec_for(args.run_scorer, args),
        secrets=list(planted["planted_keys"]),
        heldout_dataset="photos-heldout",
        measure=measure,
        progress=False,
        flag=FlagPolicy(fraction=args.fraction),
        mitigation=MitigationConfig(
            method="finetune", lr=args.finetune_lr, epochs=args.finetune_epochs, seed=args.seed
        ),
    )
    s = hygiene_flow(params)
    b, a = s.before, s.after
    print("| measure | before | after |\n|---|---:|---:|")
    print(
        f"| Mem% ({s.mem_rule}, δ {s.mem_tau:.4g}) | {b['mem_percent']:.1f} | "
        f"{a['mem_percent']:.1f} |"
    )
    print(
        f"| held-out FPR | {100 * (s.heldout_fpr.get('before') or 0):.1f}% | "
        f"{100 * (s.heldout_fpr.get('after') or 0):.1f}% |"
    )
    print(f"| FD | {b['fd']:.4g} | {a['fd']:.4g} |")
    print(f"| KID | {b['kid']:.4g} | {a['kid']:.4g} |")
    closest = [(v["before"], v["after"]) for v in s.per_secret.values()]
    print(
        f"| per-secret ratio (mean) | {np.mean([c[0] for c in closest]):.3f} | "
        f"{np.mean([c[1] for c in closest]):.3f} |"
    )
    print(
        f"\nflagged {s.n_flagged_images} distinct images ({s.n_removed} samples) with "
        f"{args.run_scorer} at {100 * args.fraction:g}%; {len(s.secrets)} distinct secrets "
        f"({s.secret_samples} samples); mitigation {s.mitigation}; gate "
        f"{'PASSED' if s.gate_passed else 'FAILED'}; stage seconds {s.stage_seconds}"
    )
    print(
        "\nper secret (ratio before -> after): "
        + ", ".join(f"{k}: {v['before']:.3f} -> {v['after']:.3f}" for k, v in s.per_secret.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
