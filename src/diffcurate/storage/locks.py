"""An exclusive lock on a workspace file, held across processes and threads.

``fcntl.flock`` serialises processes (two ``diffcurate release approve`` at once, or the CLI
and the dashboard). A flock belongs to an open file description, so a second ``open`` of the
same file in the same process would wait on itself: threads of one process therefore queue on
a :class:`threading.RLock` first, and only the outermost holder takes the flock, which also
makes the lock reentrant for the thread holding it. The lock file stays in place; its
existence means nothing, only a held flock does.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_POLL_S = 0.05


class LockTimeout(TimeoutError):
    """The lock stayed held by someone else for the whole timeout."""


class _PathLock:
    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_registry_lock = threading.Lock()
_registry: dict[str, _PathLock] = {}


@contextmanager
def exclusive(path: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Raises:
        LockTimeout: another process or thread held it for ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _registry_lock:
        held = _registry.setdefault(key, _PathLock())
    deadline = time.monotonic() + timeout
    if not held.thread_lock.acquire(timeout=max(timeout, 0.0)):
        raise LockTimeout(f"{path} stayed locked for {timeout:g} s")
    try:
        if held.depth == 0:
            held.fd = _flock(path, deadline, timeout)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)
                held.fd = None
    finally:
        held.thread_lock.release()


def _flock(path: Path, deadline: float, timeout: float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockTimeout(
                    f"{path} stayed locked by another process for {timeout:g} s"
                ) from None
            time.sleep(_POLL_S)
