"""The write-ahead log of one export period: records are appended as rounds finish, so a crash
(kill -9) loses nothing.

One file per period and process, in a local directory:

    open-<start_ms>-<owner>.jsonl            being written; its writer holds an flock on it
    sealed-<start_ms>-<end_ms>-<owner>.jsonl the period is over; waiting to be exported

`<owner>` is `[<replica>-]<pid>-<random>`: replicas of one service share the directory, and the
replica that wrote a log stays known (`writer_of`) to whichever replica exports it.

Each record is one `os.write` of one newline-terminated line (no user-space buffer: once
`append` returns, the line is in the kernel and survives the process). A line without its
newline is a torn write and is never exported. An `open-` file nobody holds a lock on belongs
to a process that died: `recover` seals it, ending its period at its last write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from easllm.private_files import private_dir

OPEN = re.compile(r"open-(\d+)-([\w-]+)\.jsonl")
SEALED = re.compile(r"sealed-(\d+)-(\d+)-([\w-]+)\.jsonl")
CHUNK = 1 << 20


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True)
class SealedLog:
    """A finished period's log on disk."""

    start: float
    end: float
    path: Path

    @property
    def writer(self) -> str:
        m = SEALED.fullmatch(self.path.name)
        return writer_of(m[3]) if m else ""


def writer_of(owner: str) -> str:
    """The replica name in a log's owner (`<replica>-<pid>-<random>`); "" for `<pid>-<random>`."""
    parts = owner.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else ""


class WalFile:
    """The open log of the current period; owned (flock) by this process."""

    def __init__(self, directory: Path, start: float, writer: str = "") -> None:
        private_dir(directory)
        self.start = start
        self.owner = f"{writer + '-' if writer else ''}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"open-{_ms(start)}-{self.owner}.jsonl"
        self.size = 0
        self.records = 0
        self.dirty = False
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise

    def append(self, line: bytes) -> None:
        """Write one whole line or, on a disk error, leave the file as it was and raise OSError."""
        written = 0
        try:
            while written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError:
            if written:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.size)
            raise
        self.size += written
        self.records += 1
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False
            os.fsync(self._fd)

    def seal(self, end: float) -> Path:
        """Rename to `sealed-…` (while still locked, so no one recovers it meanwhile), then close."""
        sealed = self.path.with_name(f"sealed-{_ms(self.start)}-{_ms(end)}-{self.owner}.jsonl")
        try:
            os.rename(self.path, sealed)
        except OSError:
            sealed = self.path  # still exportable; a restart would seal it again
        finally:
            self.close()
        return sealed

    def discard(self) -> None:
        """Drop an empty log."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def recover(directory: Path) -> list[SealedLog]:
    """Seal the logs of dead processes, then list every sealed log, oldest period first."""
    if not directory.is_dir():
        return []
    for path in directory.glob("open-*.jsonl"):
        m = OPEN.fullmatch(path.name)
        if m is None or not _unowned(path):
            continue
        start = int(m[1]) / 1000
        try:
            end = max(path.stat().st_mtime, start)
            os.rename(path, path.with_name(f"sealed-{m[1]}-{_ms(end)}-{m[2]}.jsonl"))
        except OSError:
            continue  # another process recovered it first
    logs = []
    for path in directory.glob("sealed-*.jsonl"):
        m = SEALED.fullmatch(path.name)
        if m is not None:
            logs.append(SealedLog(int(m[1]) / 1000, int(m[2]) / 1000, path))
    return sorted(logs, key=lambda s: (s.start, s.end))


def _unowned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock


def complete_length(path: Path) -> int:
    """Bytes up to and including the last newline: a torn last line is left out."""
    size = path.stat().st_size
    with path.open("rb") as f:
        end = size
        while end > 0:
            start = max(0, end - CHUNK)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
    return 0
