"""The ingest flow's decoding on a Dask cluster: each shard's images as a ``decode-images`` task
run (``prefect-dask``), results consumed by the flow in source order.

Exactly once under worker loss: workers only decode and hash; the flow's process builds and
writes every row (idempotent merges on the primary key), so a shard whose worker died is simply
decoded again (by Dask's rescheduling, or by re-submission here) and can never be written
twice. A task that fails for a reason of its own fails the run; shards already written stay,
and a re-run resumes after them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from diffcurate.ingest.pool import Decoded
from diffcurate.tasks.ingest import decode_images

T = TypeVar("T")


class ShardLostError(RuntimeError):
    """A shard's decode task was lost with its worker more often than allowed."""


class DaskDecoder:
    """Decodes shards as task runs on an entered ``DaskTaskRunner``.

    Args:
        runner: A started (entered) Prefect ``DaskTaskRunner``.
        max_pixels: The decompression-bomb guard passed to every task.
        in_flight: Shards submitted ahead of the one the flow consumes.
        max_attempts: Submissions of one shard before the run gives up on it.
        log: Logger for lost shards.
    """

    def __init__(
        self, runner: Any, max_pixels: int, in_flight: int, max_attempts: int = 4, log: Any = None
    ) -> None:
        self.runner = runner
        self.max_pixels = max_pixels
        self.in_flight = in_flight
        self.max_attempts = max_attempts
        self.log = log
        self.lost = 0
        self.workers: set[str] = set()

    def _submit(self, images: list[bytes | None]) -> Any:
        # Plain values: Dask rebuilds tuples in task arguments (a prefect ``quote`` is one).
        parameters = {"images": images, "max_pixels": self.max_pixels}
        return self.runner.submit(decode_images, parameters=parameters).wrapped_future

    def _result(self, images: list[bytes | None], future: Any) -> Decoded:
        for attempt in range(1, self.max_attempts + 1):
            try:
                state = future.result()
            except Exception as e:  # KilledWorker, or the worker vanished with the result
                state, error = None, f"{type(e).__name__}: {e}"
            else:
                error = state.message if state.is_crashed() else ""
            if state is not None and state.is_completed():
                worker, results = state.result(_sync=True)
                self.workers.add(worker)
                return results
            if state is not None and not state.is_crashed():
                state.result(raise_on_failure=True, _sync=True)  # raises the task's own error
                raise RuntimeError(f"decode task ended in state {state.type}")
            self.lost += 1
            if self.log is not None:
                self.log.warning("decode task lost (%s), attempt %d: re-submitting", error, attempt)
            future = self._submit(images)
        raise ShardLostError(f"a shard's decode task was lost {self.max_attempts} times")

    def map(self, items: Iterable[tuple[T, list[bytes | None]]]) -> Iterator[tuple[T, Decoded]]:
        """Decode each item's images on the cluster, ``in_flight`` items ahead."""
        pending: deque[tuple[T, list[bytes | None], Any]] = deque()
        for payload, images in items:
            pending.append((payload, images, self._submit(images)))
            if len(pending) >= self.in_flight:
                head, head_images, future = pending.popleft()
                yield head, self._result(head_images, future)
        while pending:
            head, head_images, future = pending.popleft()
            yield head, self._result(head_images, future)
