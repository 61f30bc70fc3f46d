"""BIF risk over a corpus without stored states: every worker replays the SGLD chains.

Why: :class:`~diffcurate.influence.bif_draws.PosteriorDraws` keeps every recorded state, C·T·d
numbers, which grows with the model (terabytes at Stable-Diffusion size) and is read by every
worker. The chains are a deterministic function of w*, the SGLD set, the objective and the
config: the minibatch rows come from ``keyed_generator(seed, chain, "bif-minibatch", step)``, the
Langevin noise from ``keyed_generator(seed, chain, "bif-noise", step)`` and fresh gradient draws
are keyed by (sample key, seed, chain, step), all CPU generators, none depending on which shard
is scored. A worker that holds w* (the model it loads anyway) and the SGLD set can therefore
recompute w_{c,t} instead of reading it, and evaluates its shard's losses at each recorded state
while replaying. What workers share is the SGLD set plus a 32-byte digest per recorded state and
the loss trace: independent of d.

Exactness: the replay runs :func:`~diffcurate.influence.bif.sgld_chains` on the same inputs and
evaluates losses exactly as the stored path does, so where the kernels are bit-reproducible the
scores equal the stored path's and :func:`~diffcurate.influence.bif.bif_risk`'s bit for bit
(tests check it in float64). What breaks bit-reproducibility is any kernel whose floating-point
reduction order is not fixed: CUDA without ``torch.use_deterministic_algorithms(True)`` (atomic
adds in convolution and scatter backward passes), another CPU instruction set or BLAS/oneDNN
build, possibly another thread count. A chain amplifies a one-ulp difference, so the parent
records a digest of every state and each replayed state is checked against it:
:class:`ReplayMismatchError` is raised instead of scoring shards against a different posterior.

Cost: a shard costs one replay of the chains (C·(b + (T−1)·thinning) minibatch gradient steps,
independent of the shard size) plus the C·T forward passes over the shard that the stored path
also pays, so large shards amortise it. Memory: beyond the working copy of the model, w*, the
gradients, one float64 noise vector (2·d·dtype + 8·d bytes) and the SGLD set's draws.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffcurate.influence.bif import BIFConfig, risk_result, sgld_chains
from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    SampleKey,
    ScoreResult,
    resolve_device,
)

DIGESTS = "digests.npy"
META = "meta.json"
SGLD_LOSS = "sgld_loss.npy"


class ReplayMismatchError(RuntimeError):
    """A replayed SGLD state differs from the recorded one: these kernels are not reproducible."""


def state_digest(net: torch.nn.Module) -> bytes:
    """sha256 over the exact bytes of the trainable parameters, in ``parameters()`` order."""
    h = hashlib.sha256()
    for p in net.parameters():
        if p.requires_grad:
            t = p.detach().to(device="cpu").contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy())
    return h.digest()


@dataclass(frozen=True)
class ReplayedDraws:
    """Local-posterior states replayed on demand from their keys (see module docstring).

    Attributes:
        path: Directory holding ``digests.npy`` (``[C·T, 32]`` sha256 of the recorded states),
            ``sgld_loss.npy`` and ``meta.json``.
        config: The sampler settings.
        sgld_images: The SGLD set whose minibatches drive the chains.
        sgld_keys: Its keys.
        sgld_cond: Its conditioning, or None.
    """

    path: Path
    config: BIFConfig
    sgld_images: torch.Tensor = field(repr=False)
    sgld_keys: tuple[SampleKey, ...]
    sgld_cond: torch.Tensor | None = field(default=None, repr=False)

    @property
    def sgld_loss(self) -> np.ndarray:
        """``[C, n_steps + 1]`` minibatch loss per SGLD state (convergence diagnostic)."""
        return np.load(self.path / SGLD_LOSS)

    def digests(self) -> np.ndarray:
        """``[C·T, 32]`` uint8: the sha256 of every recorded state."""
        return np.load(self.path / DIGESTS)

    @classmethod
    def record(
        cls,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        sgld_images: torch.Tensor,
        sgld_keys: Sequence[SampleKey],
        config: BIFConfig,
        path: str | Path,
        sgld_cond: torch.Tensor | None = None,
    ) -> ReplayedDraws:
        """Run the chains once, keeping only state digests and the loss trace (reused if done).

        ``path`` must identify everything the chains depend on (model weights, SGLD set,
        objective, config): the caller names it by a fingerprint of those.
        """
        path = Path(path)
        if not (path / META).is_file():
            path.mkdir(parents=True, exist_ok=True)
            digests = np.zeros((config.chains * config.draws, 32), dtype=np.uint8)

            def observe(chain: int, draw: int, net: torch.nn.Module) -> None:
                digests[chain * config.draws + draw] = np.frombuffer(state_digest(net), np.uint8)

            loss = sgld_chains(objective, model, sgld_images, sgld_keys, observe, config, sgld_cond)
            np.save(path / DIGESTS, digests)
            np.save(path / SGLD_LOSS, loss)
            d = sum(p.numel() for p in model.parameters() if p.requires_grad)
            meta = {
                "n_params": d,
                "n_draws": config.chains * config.draws,
                "draws_per_sample": objective.schedule.n_draws,
                **config.model_dump(),
            }
            tmp = path / f"{META}.partial"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path / META)  # published last: marks the record complete
        return cls(path, config, sgld_images, tuple(sgld_keys), sgld_cond)

    def disk_bytes(self) -> int:
        """Bytes of this record's files (digests, loss trace, meta): O(C·T), not O(d).

        The SGLD set the workers also need travels with the run state (it is the fit set).
        """
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def memory_bytes(self) -> int:
        """Estimated worker memory of the replay beyond the model's working copy.

        w* and the gradients (d numbers each, working dtype), the float64 noise vector, and the
        SGLD set's expanded draws (x_t and target for each of its K draws, plus x0) and one
        fresh minibatch; per-sample sizes are the images' (an upper bound for latent models).
        """
        meta = json.loads((self.path / META).read_text())
        itemsize = DTYPES[self.config.dtype].itemsize
        d, k = int(meta["n_params"]), int(meta["draws_per_sample"])
        n = len(self.sgld_keys)
        m = min(self.config.batch_size, n)
        pixels = int(self.sgld_images[0].numel()) if n else 0
        return (2 * itemsize + 8) * d + ((2 * k + 1) * n + 2 * k * m) * pixels * itemsize

    def traces(
        self,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        images: torch.Tensor,
        sample_keys: Sequence[SampleKey],
        cond: torch.Tensor | None = None,
    ) -> np.ndarray:
        """``[C, T, n]`` float64 losses ℓ_i(w_{c,t}) of ``images``, evaluated while replaying.

        Raises:
            ReplayMismatchError: A replayed state is not bit-identical to the recorded one.
        """
        config = self.config
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        keys = list(sample_keys)
        if len(set(map(str, keys))) != len(keys):
            raise ValueError("duplicate sample keys")
        batch = objective.prepare(images, keys, dtype, device, cond)
        expected = self.digests()
        out = np.full((config.chains, config.draws, len(keys)), np.nan)

        def observe(c: int, k: int, net: torch.nn.Module) -> None:
            if state_digest(net) != expected[c * config.draws + k].tobytes():
                raise ReplayMismatchError(
                    f"replayed SGLD state (chain {c}, draw {k}) differs from the recorded one: "
                    "this worker's kernels are not bit-reproducible (CUDA without deterministic "
                    "algorithms, another CPU or BLAS build, another thread count); score with "
                    "stored states instead"
                )
            losses = objective.batch_loss(net, batch, config.batch_items).mean(dim=1)
            out[c, k] = losses.to(device="cpu", dtype=torch.float64).numpy()
            if not np.isfinite(out[c, k]).all():
                raise FloatingPointError(
                    f"non-finite losses at SGLD draw {k} of chain {c}; lower step_size "
                    f"(now {config.step_size:g}) or raise localization"
                )

        sgld_chains(
            objective, model, self.sgld_images, self.sgld_keys, observe, config, self.sgld_cond
        )
        return out

    def risk(
        self,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        images: torch.Tensor,
        sample_keys: Sequence[SampleKey],
        cond: torch.Tensor | None = None,
    ) -> ScoreResult:
        """Posterior loss variance per sample, as :func:`~diffcurate.influence.bif.bif_risk`."""
        traces = self.traces(objective, model, images, sample_keys, cond)
        return risk_result(objective, traces, sample_keys, self.config)
