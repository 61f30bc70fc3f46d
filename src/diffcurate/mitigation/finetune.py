"""Surgical fine-tune (seed 000 §3.4): continue training on the kept samples only.

The premise: removing the highest-risk samples and briefly re-fitting on the rest lets the
model relax away from what it memorised, at a small fraction of retraining's cost. Seed 000
used one epoch at lr 2e-6 on a large pretrained model; on small models that budget changes
nothing (``benchmarks/results/table1.md``), so steps, learning rate and warm-up are settings
whose values ``benchmarks/mitigation.py`` sweeps and reports.
"""

from __future__ import annotations

from diffcurate.mitigation.base import (
    MitigationConfig,
    MitigationData,
    MitigationResult,
    copy_of,
    register_mitigation,
)
from diffcurate.mitigation.loop import FineTuneLoop
from diffcurate.models.diffusion import DiffusionModel


class FineTune:
    """Every UNet parameter trained on the kept samples' diffusion loss."""

    name = "finetune"
    needs_forget = False
    summary = "surgical fine-tune on the kept samples (seed 000 §3.4)"

    def steps_for(self, config: MitigationConfig, n_retain: int) -> int:
        return config.fine_tune_steps(n_retain)

    def run(
        self, model: DiffusionModel, data: MitigationData, config: MitigationConfig, progress: bool
    ) -> tuple[DiffusionModel, MitigationResult]:
        candidate = copy_of(model)
        loop = FineTuneLoop(candidate, data, config)
        steps = self.steps_for(config, len(data.retain))
        return candidate, loop.run(self.name, steps, config.lr, FineTuneLoop.retain_step, progress)


register_mitigation(FineTune())
