"""Caption-side perturbations (Somepalli et al. 2023): identity when off, keyed, as specified."""

import torch

from diffcurate.mitigation.captions import perturb_captions


def _cond(n=64, seq=4, dim=16):
    return torch.randn(n, seq, dim, generator=torch.Generator().manual_seed(0))


def test_off_is_identity():
    cond = _cond()
    assert torch.equal(perturb_captions(cond, 0.0, 0.0, seed=1, step=3), cond)


def test_replacement_swaps_rows_for_other_rows():
    cond = _cond()
    out = perturb_captions(cond, 0.0, 1.0, seed=1, step=3)
    for i in range(len(cond)):
        match = [j for j in range(len(cond)) if torch.equal(out[i], cond[j])]
        assert match and match[0] != i  # some other row's caption, never its own
    half = perturb_captions(cond, 0.0, 0.5, seed=1, step=3)
    kept = sum(torch.equal(half[i], cond[i]) for i in range(len(cond)))
    assert 16 <= kept <= 48  # Binomial(64, 0.5) within ±4 sd
    assert torch.equal(half, perturb_captions(cond, 0.0, 0.5, seed=1, step=3))  # keyed
    assert not torch.equal(half, perturb_captions(cond, 0.0, 0.5, seed=1, step=4))


def test_noise_is_relative_to_the_states_std():
    cond = _cond(n=256) * 3.0
    out = perturb_captions(cond, 0.2, 0.0, seed=5, step=0)
    ratio = float((out - cond).std() / cond.std())
    assert abs(ratio - 0.2) < 0.01
    assert torch.equal(out, perturb_captions(cond, 0.2, 0.0, seed=5, step=0))
