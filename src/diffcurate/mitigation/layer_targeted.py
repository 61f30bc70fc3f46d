"""Layer-targeted fine-tune (seed 000's "layer-wise" view): train only where the risk sits.

Seed 000 scores memorisation by the layer-wise curvature trace: a sample is risky when the
loss is sharp around it, and the per-layer parts say in which layers. If the removed samples'
sharpness concentrates in a few layers, those layers are where the copies are encoded, so a
fine-tune of those layers alone (everything else frozen bit for bit) should undo the copies at
a fraction of a full fine-tune's cost and with less drift elsewhere.

Which layers: the per-layer GGN trace (:func:`diffcurate.influence.trace.trace_scores`) of a
sample of removed and of kept samples; a layer's *excess* is the removed samples' mean trace
minus the kept samples', so layers that are sharp for every sample (the output convolution,
say) do not crowd out the ones specific to the removed images. The fewest layers holding
``layer_coverage`` of the total positive excess are trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.trace import TraceConfig, layer_groups, trace_scores
from diffcurate.keyed import keyed_generator
from diffcurate.mitigation.base import (
    MitigationConfig,
    MitigationData,
    register_mitigation,
)
from diffcurate.mitigation.loop import FineTuneLoop, LoopMitigation
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.training_data import TrainingData

LAYER_DRAWS = 2
"""(t, ε) draws per probed sample for the per-layer trace."""
LAYER_PROBES = 2
"""Hutchinson probes per draw."""


def select_layers(
    names: Sequence[str], removed: np.ndarray, kept: np.ndarray | None, coverage: float
) -> list[str]:
    """The fewest layers holding ``coverage`` of the removed samples' excess per-layer risk.

    Args:
        names: Layer names.
        removed: Mean per-layer risk of the removed samples ``[L]``.
        kept: Mean per-layer risk of the kept samples ``[L]``, or None (no baseline: rank by
            the removed samples' own risk).
        coverage: Share (0, 1] of the total positive excess the chosen layers must hold.

    Returns:
        Layer names, highest excess first. When no layer has positive excess, the removed
        samples' own risk ranks them instead.
    """
    removed = np.asarray(removed, dtype=np.float64)
    excess = removed if kept is None else removed - np.asarray(kept, dtype=np.float64)
    excess = np.clip(excess, 0.0, None)
    if excess.sum() <= 0:
        excess = np.clip(removed, 0.0, None)
    if excess.sum() <= 0:
        raise ValueError("no layer carries any risk for the removed samples")
    order = np.argsort(-excess, kind="stable")
    share = np.cumsum(excess[order]) / excess.sum()
    k = int(np.searchsorted(share, coverage - 1e-12)) + 1
    return [names[i] for i in order[:k]]


def _probe(x: TrainingData, n: int, seed: int, stream: str) -> torch.Tensor:
    gen = keyed_generator(seed, "layer-probe", stream, 0)
    return torch.randperm(len(x), generator=gen)[:n]


def layer_risk(
    model: DiffusionModel, data: MitigationData, config: MitigationConfig
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Per-layer mean GGN trace of a keyed sample of removed and of kept samples."""
    if data.forget is None or len(data.forget) == 0:
        raise ValueError("layer-finetune needs the removed samples to locate their risk")
    n_train = int(model.scheduler.config.num_train_timesteps)
    schedule = TimestepSchedule(band=(0, n_train), draws_per_sample=LAYER_DRAWS)
    objective = DiffusionObjective(model.scheduler, schedule, config.seed)
    trace = TraceConfig(probes=LAYER_PROBES, seed=config.seed, device=config.device)
    means = []
    for stream, x in (("forget", data.forget), ("retain", data.retain)):
        idx = _probe(x, config.layer_probe_samples, config.seed, stream)
        keys = [f"{stream}-{int(i)}" for i in idx]
        rows, cond = x.batch(idx)
        result = trace_scores(objective, model.unet, rows, keys, trace, cond)
        assert result.per_layer is not None
        means.append((result.layer_names, result.per_layer.mean(axis=0)))
    (names, removed), (_, kept) = means
    return names, removed, kept


class LayerFineTune(LoopMitigation):
    """Fine-tune only the layers where the removed samples' curvature concentrates."""

    name = "layer-finetune"
    needs_forget = True
    summary = "fine-tune only the layers where the removed samples' trace concentrates"

    def prepare(
        self, model: DiffusionModel, candidate: DiffusionModel, data: MitigationData,
        config: MitigationConfig,
    ) -> FineTuneLoop:  # fmt: skip
        names, removed, kept = layer_risk(model, data, config)
        layers = select_layers(names, removed, kept, config.layer_coverage)
        params = [n for n, _ in candidate.unet.named_parameters()]
        layer_names, groups = layer_groups(params)
        owned = dict(zip(layer_names, groups, strict=True))
        trainable = [p for layer in layers for p in owned[layer]]
        loop = FineTuneLoop(candidate, data, config, trainable=trainable)
        # The layer probe's cost: one GGN pass per (sample, draw, probe) of both samples.
        assert data.forget is not None  # layer_risk refused a missing forget set
        probed = min(config.layer_probe_samples, len(data.retain))
        probed += min(config.layer_probe_samples, len(data.forget))
        loop.sample_passes += probed * LAYER_DRAWS * LAYER_PROBES
        loop.detail["layers"] = layers
        loop.detail["excess"] = {
            n: float(r - k) for n, r, k in zip(names, removed, kept, strict=True)
        }
        return loop


register_mitigation(LayerFineTune())
