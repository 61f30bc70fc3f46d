"""Forgetting terms raise the removed samples' loss while the kept samples' loss stays
bounded; EraseDiff's multiplier and the ascent's cap by hand."""

import pytest
import torch

from diffcurate.mitigation import MitigationConfig, mitigate
from diffcurate.mitigation.erasediff import bome_multiplier
from forget_split import fixed_loss


def _t(*v):
    return [torch.tensor(list(v), dtype=torch.float64)]


def test_bome_multiplier_by_hand():
    # ∇F ⟂ ∇q: λ = η.
    assert bome_multiplier(_t(1.0, 0.0), _t(0.0, 2.0), eta=0.1) == pytest.approx(0.1)
    # ∇F opposes ∇q: (0.1·1 − (−1)) / 1 = 1.1.
    assert bome_multiplier(_t(1.0, 0.0), _t(-1.0, 0.0), eta=0.1) == pytest.approx(1.1)
    # ∇F already decreases q fast enough: λ = 0.
    assert bome_multiplier(_t(3.0, 0.0), _t(1.0, 0.0), eta=0.1) == 0.0
    assert bome_multiplier(_t(1.0, 0.0), _t(0.0, 0.0), eta=0.1) == 0.0


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("erasediff", {"lr": 1e-3, "steps": 30}),
        ("gradient-ascent", {"lr": 1e-3, "forget_cap": 5.0, "steps": 15}),
    ],
)
def test_forgetting_raises_the_removed_loss_and_bounds_the_kept(trained, method, extra):
    model, keep, forget = trained
    cfg = MitigationConfig(method=method, batch_size=8, forget_batch_size=8, seed=0, **extra)
    candidate, result = mitigate(model, keep, cfg, removed_images=forget)
    f0, f1 = fixed_loss(model, forget[:1]), fixed_loss(candidate, forget[:1])
    k0, k1 = fixed_loss(model, keep), fixed_loss(candidate, keep)
    # On a model this small, forgetting one image costs some of the others: the removed
    # image's loss must rise well beyond the kept images', which stays bounded.
    assert f1 > 1.3 * f0, (f0, f1)
    assert k1 < 1.5 * k0, (k0, k1)
    assert f1 / f0 > k1 / k0 + 0.2, (f1 / f0, k1 / k0)
    # A plain fine-tune with the same budget does not do this: the forgetting term does.
    plain, _ = mitigate(model, keep, cfg.model_copy(update={"method": "finetune"}))
    assert fixed_loss(plain, forget[:1]) < f0 * 1.1
    assert len(result.forget_losses) == cfg.steps


def test_ascent_beyond_the_cap_is_a_plain_fine_tune(trained):
    model, keep, forget = trained
    cfg = MitigationConfig(method="gradient-ascent", steps=4, lr=1e-3, batch_size=8,
                           forget_batch_size=8, forget_cap=1e-9)  # fmt: skip
    capped, result = mitigate(model, keep, cfg, removed_images=forget)
    plain, _ = mitigate(model, keep, cfg.model_copy(update={"method": "finetune"}))
    for a, b in zip(capped.unet.parameters(), plain.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert result.sample_passes == 4 * (8 + 8)


def test_erasediff_compute_count_and_multipliers(trained):
    model, keep, forget = trained
    cfg = MitigationConfig(method="erasediff", steps=3, batch_size=8, forget_batch_size=4,
                           erase_inner_steps=2)  # fmt: skip
    _, result = mitigate(model, keep, cfg, removed_images=forget)
    assert result.sample_passes == 3 * (8 + 4 * (2 + 2))
    assert len(result.detail["lambda"]) == 3 and min(result.detail["lambda"]) >= 0


def test_unlearning_needs_the_removed_samples(trained):
    model, keep, _ = trained
    with pytest.raises(ValueError, match="needs the removed samples"):
        mitigate(model, keep, MitigationConfig(method="erasediff", steps=1))


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="erasediff, finetune"):
        MitigationConfig(method="prune-harder")
