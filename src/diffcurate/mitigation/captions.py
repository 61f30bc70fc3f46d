"""Caption-side mitigation for text-conditional models (Somepalli et al., NeurIPS 2023).

"Understanding and Mitigating Copying in Diffusion Models" finds that copying is driven by
captions that pin one training image down exactly, and that randomising the conditioning
during training reduces it at little cost in quality. Two of their training-time
interventions work on the caption states this platform trains on (the tokenizer is not in the
training loop, so the token-level variants are out of reach):

* Gaussian noise injection (GNI): add ``N(0, σ²)`` to the caption states; here σ is relative to
  the states' own standard deviation, so one setting fits text encoders of any scale.
* Random caption replacement (RC): with probability p, a row's caption is swapped for another
  training sample's caption (here: another row of the same batch, which is a uniform draw from
  the kept set because batches are).

Both are drawn from keyed generators (seed, step), so a fine-tune is reproducible and
resumable like :func:`diffcurate.models.train.train`. Caption dropout to the empty caption is
applied after these, so dropped rows stay exactly unconditional.
"""

from __future__ import annotations

import torch

from diffcurate.keyed import keyed_generator


def perturb_captions(
    cond: torch.Tensor, noise: float, replace: float, seed: int, step: int
) -> torch.Tensor:
    """Random caption replacement, then Gaussian noise injection, on one batch of states.

    Args:
        cond: Caption states ``[B, seq, dim]``.
        noise: GNI standard deviation relative to ``cond``'s std (0: none).
        replace: Probability that a row takes another row's caption (0: none).
        seed: Run seed.
        step: Optimiser step (keys the draws).

    Returns:
        The perturbed states (a new tensor; ``cond`` is not modified).
    """
    out = cond
    if replace > 0 and len(cond) > 1:
        gen = keyed_generator(seed, "captions", "replace", step)
        swap = torch.rand(len(cond), generator=gen) < replace
        # A uniform other row: shift by 1..B-1 so a swapped row never keeps its own caption.
        shift = torch.randint(1, len(cond), (len(cond),), generator=gen)
        source = (torch.arange(len(cond)) + shift) % len(cond)
        source = torch.where(swap, source, torch.arange(len(cond)))
        out = out[source.to(out.device)]
    if noise > 0:
        gen = keyed_generator(seed, "captions", "noise", step)
        scale = noise * float(cond.detach().float().std())
        out = out + scale * torch.randn(out.shape, generator=gen).to(out)
    return out
