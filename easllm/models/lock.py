"""One preparer per model file on this machine: replicas and commands that start at the same moment
wait for the first one instead of writing the same `.partial` file.

    with model_lock(target):          # target: the file being prepared
        if not ready(target):
            prepare(target)

The lock is an advisory `flock` on `<target>.lock` (py-filelock), released by the kernel when its
holder dies, so a killed preparer never leaves the others waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from easllm.errors import ModelNotFound

log = logging.getLogger(__name__)
WAIT_NOTICE = 2.0  # seconds before saying that another process prepares the model
LOCK_TIMEOUT = 1800.0  # longest wait for another preparer (a 0.5 GB assembly takes ~10 s)


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextmanager
def model_lock(
    target: Path, progress: Callable[[str], None] = log.info, timeout: float = LOCK_TIMEOUT
) -> Iterator[None]:
    """Hold the machine-wide lock of `target` (a model file or folder being prepared)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(target), thread_local=False)
    try:
        lock.acquire(timeout=min(WAIT_NOTICE, timeout))
    except Timeout:
        progress(f"{target.name}: another process is preparing it; waiting")
        try:
            lock.acquire(timeout=max(timeout - WAIT_NOTICE, 0.0))
        except Timeout as exc:
            raise ModelNotFound(
                f"{target.name}: another process held {lock_path(target)} for over {timeout:.0f}s"
            ) from exc
    try:
        yield
    finally:
        lock.release()
