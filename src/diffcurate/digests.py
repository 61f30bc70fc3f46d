"""Content digests of tensors, modules and JSON-able values, for cache names.

A cache entry (EK-FAC factors, fitted scores) is named by the sha256 of everything that
determines it, so a changed weight, input or option can never read a stale entry. One
definition, in the bottom layer, so that every cache hashes tensors the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def update_tensor(h: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and exact bytes to the hash object ``h``."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def content_digest(*parts: object, length: int = 24) -> str:
    """Hex sha256 over modules (sorted state dict), tensors (bytes) and JSON-able values.

    Parts are separated, so ``("ab", "c")`` and ``("a", "bc")`` differ. ``length`` truncates
    the hex digest (cache names, not security).
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for name, value in sorted(part.state_dict().items()):
                h.update(name.encode())
                update_tensor(h, value)
        elif isinstance(part, torch.Tensor):
            update_tensor(h, part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:length]
