"""Layer-targeted fine-tune: the layer rule by hand, frozen layers bit-identical."""

import numpy as np
import pytest
import torch

from diffcurate.influence.trace import layer_groups
from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.mitigation.layer_targeted import select_layers
from diffcurate.models.reference import reference_model
from forget_split import split

NAMES = ["a", "b", "c", "d"]


def test_select_layers_by_excess_over_the_kept_samples():
    removed, kept = np.array([5.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0])
    # excess = [4, 0, 2, 0]; shares 4/6 then 6/6.
    assert select_layers(NAMES, removed, kept, 0.5) == ["a"]
    assert select_layers(NAMES, removed, kept, 0.7) == ["a", "c"]
    assert select_layers(NAMES, removed, kept, 1.0) == ["a", "c"]
    # "b" is sharp for every sample: without the kept baseline it would rank second.
    assert select_layers(NAMES, np.array([5.0, 4.0, 3.0, 0.0]), None, 0.7) == ["a", "b"]
    # No excess anywhere: fall back to the removed samples' own risk.
    assert select_layers(NAMES, np.array([1.0, 2.0, 0.0, 0.0]), np.full(4, 9.0), 0.5) == ["b"]
    with pytest.raises(ValueError):
        select_layers(NAMES, np.zeros(4), None, 0.5)


def test_only_the_selected_layers_change():
    keep, forget = split()
    model = reference_model("tiny", seed=0)
    cfg = MitigationConfig(method="layer-finetune", steps=4, lr=1e-2, batch_size=8, seed=1,
                           layer_coverage=0.3, layer_probe_samples=4)  # fmt: skip
    candidate, result = mitigate(model, keep, cfg, removed_images=forget)
    layers = result.detail["layers"]
    names, groups = layer_groups([n for n, _ in model.unet.named_parameters()])
    owned = dict(zip(names, groups, strict=True))
    trainable = {p for layer in layers for p in owned[layer]}
    assert set(result.trainable) == trainable and 0 < len(layers) < len(names)
    after = dict(candidate.unet.named_parameters())
    for name, p in model.unet.named_parameters():
        if name in trainable:
            assert not torch.equal(p, after[name]), name
        else:
            assert torch.equal(p, after[name]), name  # frozen: bit-identical
    # The chosen layers are the top of the recorded excess ranking.
    excess = result.detail["excess"]
    ranked = sorted(excess, key=lambda n: -excess[n])
    assert layers == ranked[: len(layers)]
    assert all(p.requires_grad for p in candidate.unet.parameters())  # restored afterwards
