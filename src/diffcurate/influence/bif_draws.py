"""BIF risk over a corpus: run the localised SGLD chains ONCE, score any shard against them.

:func:`diffcurate.influence.bif.bif_risk` re-runs the chains for every call, so scoring a corpus
shard by shard with a fixed SGLD set costs (number of shards) × the chains. The chains do not
depend on the shard (same seed, same SGLD set), only the loss traces do, so here the recorded
posterior states w_{c,t} are written once to a ``.npy`` file ``[C·T, d]`` (working dtype, every
trainable parameter in ``model.parameters()`` order) and each shard's traces are evaluated at
those states: a shard costs C·T forward passes over its own images, the chains are paid once.

The numbers are those of ``bif_risk(..., sgld_images=S, sgld_keys=K)`` for the same SGLD set:
the states are the exact tensors ``sgld_chains`` hands its observer, and a sample's loss at a
state depends only on its own keyed draws (tests check equality in float64).

Disk cost: C·T·d numbers (4 bytes each in float32): with the paper's defaults (4 chains × 100
draws) about 1.1 GB for the 0.7M-parameter ``digits-8px`` UNet. Memory: one state at a time
(the file is memory-mapped) plus the shard's draws. A crash while recording leaves only a
``.partial`` file; the states are published by an atomic rename. Where C·T·d numbers are too
many to store, :mod:`diffcurate.influence.bif_replay` gives the same scores from digests only.

Pure torch + numpy: imports no prefect, lancedb, duckdb or great_expectations.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
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
    scoring_mode,
)

STATES = "states.npy"
META = "meta.json"
SGLD_LOSS = "sgld_loss.npy"


def _trainable(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


@dataclass(frozen=True)
class PosteriorDraws:
    """Recorded local-posterior states of one set of chains (see module docstring).

    Attributes:
        path: Directory holding ``states.npy``, ``sgld_loss.npy`` and ``meta.json``.
        config: The sampler settings that produced them.
    """

    path: Path
    config: BIFConfig

    @property
    def sgld_loss(self) -> np.ndarray:
        """``[C, n_steps + 1]`` minibatch loss per SGLD state (convergence diagnostic)."""
        return np.load(self.path / SGLD_LOSS)

    def states(self) -> np.ndarray:
        """The ``[C·T, d]`` states, memory-mapped read-only."""
        return np.load(self.path / STATES, mmap_mode="r")

    def disk_bytes(self) -> int:
        """Bytes on disk that every worker reads: C·T·d numbers plus the small diagnostics."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def memory_bytes(self) -> int:
        """Worker memory the state adds to the model's working copy: one state row of d numbers.

        The memory-mapped file's pages are the OS page cache, shared by a host's workers.
        """
        states = self.states()
        return int(states.shape[1] * states.dtype.itemsize)

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
    ) -> PosteriorDraws:
        """Run the chains and store their recorded states under ``path`` (reused if complete).

        ``path`` must identify everything the states depend on (model weights, SGLD set,
        objective, config): the caller names it by a fingerprint of those.
        """
        path = Path(path)
        if (path / META).is_file():
            return cls(path=path, config=config)
        path.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[config.dtype]
        d = sum(p.numel() for p in _trainable(model))
        if d == 0:
            raise ValueError("the model has no trainable parameters to sample")
        partial = path / f"{STATES}.partial"
        states = np.lib.format.open_memmap(
            partial,
            mode="w+",
            dtype=np.float64 if dtype == torch.float64 else np.float32,
            shape=(config.chains * config.draws, d),
        )

        def observe(chain: int, draw: int, net: torch.nn.Module) -> None:
            flat = torch.cat([p.detach().reshape(-1) for p in _trainable(net)])
            states[chain * config.draws + draw] = flat.to(device="cpu").numpy()

        loss = sgld_chains(objective, model, sgld_images, sgld_keys, observe, config, sgld_cond)
        states.flush()
        os.replace(partial, path / STATES)
        np.save(path / SGLD_LOSS, loss)
        meta = {"n_params": d, "draws": config.chains * config.draws, **config.model_dump()}
        (path / META).write_text(json.dumps(meta, indent=1))
        return cls(path=path, config=config)

    def traces(
        self,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        images: torch.Tensor,
        sample_keys: Sequence[SampleKey],
        cond: torch.Tensor | None = None,
    ) -> np.ndarray:
        """``[C, T, n]`` float64 losses ℓ_i(w_{c,t}) of ``images`` at every recorded state."""
        config = self.config
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        keys = list(sample_keys)
        if len(set(map(str, keys))) != len(keys):
            raise ValueError("duplicate sample keys")
        net = copy.deepcopy(model).to(device=device, dtype=dtype)
        params = _trainable(net)
        sizes = [p.numel() for p in params]
        states = self.states()
        if states.shape[1] != sum(sizes):
            raise ValueError(
                f"the recorded states have {states.shape[1]} parameters but the model has "
                f"{sum(sizes)}: they belong to another model"
            )
        out = np.empty((config.chains, config.draws, len(keys)))
        with scoring_mode(net):
            batch = objective.prepare(images, keys, dtype, device, cond)
            for c in range(config.chains):
                for k in range(config.draws):
                    row = torch.from_numpy(np.array(states[c * config.draws + k]))  # copy
                    with torch.no_grad():
                        for p, part in zip(params, row.split(sizes), strict=True):
                            p.copy_(part.reshape(p.shape).to(device=device, dtype=dtype))
                    losses = objective.batch_loss(net, batch, config.batch_items).mean(dim=1)
                    out[c, k] = losses.to(device="cpu", dtype=torch.float64).numpy()
                    if not np.isfinite(out[c, k]).all():
                        raise FloatingPointError(
                            f"non-finite losses at SGLD draw {k} of chain {c}; lower step_size "
                            f"(now {config.step_size:g}) or raise localization"
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
