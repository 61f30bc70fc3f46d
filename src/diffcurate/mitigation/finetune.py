"""Surgical fine-tune (seed 000 §3.4): continue training on the kept samples only.

The premise: removing the highest-risk samples and briefly re-fitting on the rest lets the
model relax away from what it memorised, at a small fraction of retraining's cost. Seed 000
used one epoch at lr 2e-6 on a large pretrained model; on small models that budget changes
nothing (``benchmarks/results/table1.md``), so steps, learning rate and warm-up are settings
whose values ``benchmarks/mitigation.py`` sweeps and reports.
"""

from __future__ import annotations

from diffcurate.mitigation.base import register_mitigation
from diffcurate.mitigation.loop import LoopMitigation


class FineTune(LoopMitigation):
    """Every UNet parameter trained on the kept samples' diffusion loss."""

    name = "finetune"
    needs_forget = False
    summary = "surgical fine-tune on the kept samples (seed 000 §3.4)"


register_mitigation(FineTune())
