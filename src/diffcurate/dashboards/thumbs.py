"""PNG thumbnails of stored images, rendered on the server (no client-side image code)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

THUMB_SIDE = 96


def thumbnail_png(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """Fit an image in ``side``×``side``: small images (8×8 digits) are enlarged with
    nearest-neighbour so pixels stay crisp; large ones are reduced with area averaging."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    w, h = img.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
    out = io.BytesIO()
    img.resize(size, resample=resample).save(out, format="PNG")
    return out.getvalue()


class ThumbCache:
    """A bounded LRU of rendered thumbnails (thread-safe)."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
