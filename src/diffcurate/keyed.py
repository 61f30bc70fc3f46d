"""Keyed random numbers: a draw depends only on ``(seed, key, stream, index)``.

Every stochastic step (training batches and noise, sampling, scorer draws, tiny reference
data) seeds a fresh CPU generator from a hash of what the draw *is*, never from what ran
before it. So a sample gets the same draws whatever batch or shard it lands in, on CPU and
CUDA alike, and a resumed run repeats an uninterrupted one.

This module sits in the bottom layer (it imports only torch) so that ``models`` and
``influence`` share one definition without importing each other.
"""

from __future__ import annotations

import hashlib

import torch

SampleKey = int | str
"""A sample identifier. Keys are hashed through ``str(key)``, so ``7`` and ``"7"`` coincide."""


def keyed_seed(seed: int, key: SampleKey, stream: str, index: int) -> int:
    """A 63-bit RNG seed determined only by ``(seed, key, stream, index)``.

    Why a hash: string sample ids need a stable, process-independent mapping (``hash()`` is
    salted per process, blake2b is not), and arithmetic schemes such as ``seed + index`` make
    different (seed, sample) pairs collide onto the same stream.

    Args:
        seed: The run-level seed.
        key: The sample's identifier.
        stream: Which random quantity this is (e.g. ``"t"``, ``"eps"``, ``"ggn-probe"``), so
            different quantities of the same draw are independent.
        index: The draw index within the sample.

    Returns:
        A non-negative integer below 2**63 for ``torch.Generator.manual_seed``.
    """
    text = f"{int(seed)}\x1f{key}\x1f{stream}\x1f{int(index)}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(seed: int, key: SampleKey, stream: str, index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`keyed_seed` (see there for why)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(keyed_seed(seed, key, stream, index))
    return gen
