"""Bundled-model assembly once per machine: concurrent callers wait on the model's lock and find
it verified; a killed holder releases the lock; a holder that never finishes is reported."""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from easllm.errors import ModelNotFound
from easllm.models.bundled import BundledModel, ensure_bundled
from easllm.models.lock import lock_path, model_lock


class SlowAssembly:
    def __init__(self) -> None:
        self.calls = 0
        self.partials: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, target: Path, progress: object) -> None:
        with self._lock:
            self.calls += 1
        self.partials.append(target.exists())  # a .partial someone else is writing?
        with target.open("wb") as out:
            for _ in range(5):
                out.write(b"x" * 1000)
                time.sleep(0.05)


def test_concurrent_callers_assemble_a_bundled_model_once(tmp_path: Path) -> None:
    assemble = SlowAssembly()
    model = BundledModel("tiny", "tiny.gguf", "test", "none", False, assemble, "0" * 64)
    messages: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_bundled(model, tmp_path, messages.append), range(4)))
    assert assemble.calls == 1 and assemble.partials == [False]
    assert {str(p) for p in paths} == {str(tmp_path / "models" / "tiny.gguf")}
    assert (tmp_path / "models" / "tiny.gguf").stat().st_size == 5000
    assert not (tmp_path / "models" / "tiny.gguf.partial").exists()
    assert ensure_bundled(model, tmp_path) == paths[0] and assemble.calls == 1


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)",
         str(lock_path(target))],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        with pytest.raises(ModelNotFound, match="another process held"), model_lock(target, timeout=0.3):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        with model_lock(target, timeout=5):
            assert time.monotonic() - started < 2
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
