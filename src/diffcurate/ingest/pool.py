"""Where a shard's images are decoded and hashed: in the flow's process or in worker processes.

Decoding, SHA-256 and pHash are order-free and CPU-bound, so they fan out; the flow consumes the
results in source order (claims are first-come, first-served). A decoder keeps a bounded number
of shards in flight, which overlaps the flow's own work (reading the source, validating,
writing) with the workers' and bounds memory by ``in_flight`` shards.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Protocol, TypeVar

from diffcurate.ingest.decode import DecodeResult, decode_many

T = TypeVar("T")

Decoded = list[DecodeResult | None] | None
"""Decode results aligned with a shard's images, or ``None``: the flow decodes them itself."""


class Decoder(Protocol):
    """Maps ``(payload, images)`` items to ``(payload, decode results)``, in input order."""

    def map(self, items: Iterable[tuple[T, list[bytes | None]]]) -> Iterator[tuple[T, Decoded]]:
        """Decode each item's images; yields items in the order they came."""
        ...


class InProcessDecoder:
    """No fan-out: the flow decodes each shard itself (keeping the pixels for embeddings)."""

    def map(self, items: Iterable[tuple[T, list[bytes | None]]]) -> Iterator[tuple[T, Decoded]]:
        """Pass items through undecoded."""
        for payload, _ in items:
            yield payload, None


class ProcessPoolDecoder:
    """A pool of ``workers`` processes (forkserver: no copy of the flow's threads or locks; the
    server imports the decoder once, so each worker starts without re-importing it).

    Use as a context manager; the pool starts on entry and is shut down on exit.
    """

    def __init__(self, workers: int, max_pixels: int, in_flight: int | None = None) -> None:
        self.workers = workers
        self.max_pixels = max_pixels
        self.in_flight = in_flight or 2 * workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ProcessPoolDecoder:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([decode_many.__module__])
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def map(self, items: Iterable[tuple[T, list[bytes | None]]]) -> Iterator[tuple[T, Decoded]]:
        """Decode each item's images in the pool, ``in_flight`` items ahead of the consumer."""
        if self._pool is None:
            raise RuntimeError("ProcessPoolDecoder is used outside its `with` block")
        pending: deque[tuple[T, Future[list[DecodeResult | None]]]] = deque()
        for payload, images in items:
            pending.append((payload, self._pool.submit(decode_many, images, self.max_pixels)))
            if len(pending) >= self.in_flight:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()
