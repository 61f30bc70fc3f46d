"""Shared set-up: a tiny pixel model trained briefly on a split with an over-represented,
removed image (so forgetting has something to act on)."""

from __future__ import annotations

import pytest
import torch

from diffcurate.models.reference import reference_model
from diffcurate.models.train import TrainConfig, train
from forget_split import split


@pytest.fixture(scope="module")
def trained():
    """A ``tiny`` reference model after 60 steps on kept + removed samples."""
    keep, forget = split()
    model = reference_model("tiny", seed=0)
    train(model, torch.cat([keep, forget]),
          TrainConfig(steps=60, batch_size=16, lr=3e-3, log_every=0), progress=False)  # fmt: skip
    return model, keep, forget
