"""Periodic JSON Lines export of answered rounds (`--export-history-path`, `--export-interval`).

Periods end on multiples of the interval (UTC epoch), so an hourly export makes one file per
clock hour; the first period starts when the server does. A round is appended to the period's
write-ahead log (wal.py, in a local directory) the moment it finishes. When the period ends,
its log is sealed and a worker thread copies it to

    DIR/history-<start>-<end>[-<replica>].jsonl
        (UTC, e.g. history-20250131T120000Z-20250131T130000Z-replica-3.jsonl)

through a temporary file, fsync and a rename that never overwrites; only then is the log
deleted. A crash between the two exports the log again on the next start, and an identical
file already there counts as done, so no round appears twice. Periods without rounds make no
file. Each replica of a service (`--replica-name`, which the console sets) writes its own
files, named after it: replicas share the log directory, and a log that a stopped or killed
replica left is exported by the next one to start, still under its writer's name, so after a
rolling update every round is in the export once. A disk that is full, read-only or gone is
logged at ERROR and retried with back-off: records wait in the log (or, when the log itself
cannot be written, in memory) and serving goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from easllm.export.wal import CHUNK, WalFile, complete_length, recover
from easllm.private_files import open_private

log = logging.getLogger(__name__)

MAX_BACKLOG = 100_000  # records kept in memory while the log cannot be written; older ones are dropped
RETRY_MIN = 1.0
RETRY_MAX = 60.0
STALE_TEMP = 600.0  # seconds after which a leftover temporary file is another crash's litter


def period_name(start: float, end: float, writer: str = "") -> str:
    def stamp(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%SZ")

    suffix = f"-{writer}" if writer else ""
    return f"history-{stamp(math.floor(start))}-{stamp(math.ceil(end))}{suffix}.jsonl"


@dataclass
class _Pending:
    """A sealed period waiting for export: its log files in order, then lines no log could take."""

    start: float
    end: float
    paths: list[Path] = field(default_factory=list)
    backlog: list[bytes] = field(default_factory=list)
    writer: str = ""  # the replica that recorded these rounds


@dataclass
class ExportStats:
    records_total: int = 0
    exported_records_total: int = 0
    exported_files_total: int = 0
    export_errors_total: int = 0
    wal_errors_total: int = 0
    dropped_records_total: int = 0
    last_export_time: float | None = None


class HistoryExporter:
    def __init__(
        self,
        export_dir: Path,
        wal_dir: Path,
        interval: float,
        clock: Callable[[], float] = time.time,
        replica: str = "",
    ) -> None:
        if interval <= 0:
            raise ValueError("the export interval must be positive")
        self.replica = replica
        self.export_dir = export_dir
        self.wal_dir = wal_dir
        self.interval = interval
        self.clock = clock
        self.stats = ExportStats()
        self._lock = threading.Lock()  # the open period: record() from any thread, rotation
        self._export_lock = threading.Lock()  # one export pass at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the open period; _start == 0.0 when there is none
        self._start = 0.0
        self._end = 0.0
        self._wal: WalFile | None = None
        self._broken: list[WalFile] = []  # this period's logs that failed a write; sealed with it
        self._backlog: list[bytes] = []  # this period's lines that no log took
        self._wal_retry_at = 0.0
        self._wal_backoff = RETRY_MIN
        self._pending: list[_Pending] = []
        self._export_retry_at = 0.0
        self._export_backoff = RETRY_MIN

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the first period and start the worker; it first exports what earlier runs left."""
        with self._lock:
            if self._start == 0.0:
                self._open_period(self.clock())
        self._thread = threading.Thread(target=self._run, name="history-export", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Seal the open period and export everything, retrying until `timeout`. True when all
        records reached the export directory; otherwise they stay in the log for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._seal(self.clock())
        deadline = time.monotonic() + timeout
        while not self.export_pending():
            if time.monotonic() + RETRY_MIN > deadline:
                log.error(
                    "history export: %d period(s) not exported at shutdown; their records stay in %s "
                    "for the next start",
                    len(self._pending),
                    self.wal_dir,
                )
                return False
            time.sleep(RETRY_MIN)
        return True

    @property
    def pending_periods(self) -> int:
        return len(self._pending)

    # -- recording (any thread; never raises) ---------------------------------------------------

    def record(self, line: bytes) -> None:
        """Append one newline-terminated JSON line to the open period."""
        now = self.clock()
        with self._lock:
            self.stats.records_total += 1
            if self._start == 0.0 or now >= self._end:
                self._seal(now)
                self._open_period(now)
            if self._wal is not None:
                try:
                    self._wal.append(line)
                    return
                except OSError as exc:
                    self._wal_failed(exc)
            self._keep(line)

    # -- periods (under self._lock) -------------------------------------------------------------

    def _open_period(self, now: float) -> None:
        self._start = now
        self._end = (math.floor(now / self.interval) + 1) * self.interval
        self._try_open_wal()

    def _try_open_wal(self) -> None:
        try:
            self._wal = WalFile(self.wal_dir, self._start, self.replica)
        except OSError as exc:
            self._wal = None
            self._wal_failed(exc)

    def _seal(self, now: float) -> None:
        """End the open period at its boundary, or now when closing early."""
        if self._start == 0.0:
            return
        item = _Pending(self._start, min(now, self._end), backlog=self._backlog, writer=self.replica)
        logs = [*self._broken, *([self._wal] if self._wal is not None else [])]
        self._start, self._wal, self._broken, self._backlog = 0.0, None, [], []
        for wal in logs:
            if wal.records == 0 and wal.size == 0:
                wal.discard()
            else:
                item.paths.append(wal.seal(item.end))
        if item.paths or item.backlog:
            self._pending.append(item)
            self._wake.set()

    def _wal_failed(self, exc: OSError) -> None:
        self.stats.wal_errors_total += 1
        if self._wal is not None:
            self._broken.append(self._wal)  # its lines are exported with the period; no more writes
            self._wal = None
        self._wal_retry_at = self.clock() + self._wal_backoff
        log.error(
            "history export: cannot write the write-ahead log in %s (%s); records are kept in memory, "
            "retrying in %.0fs",
            self.wal_dir,
            exc,
            self._wal_backoff,
        )
        self._wal_backoff = min(self._wal_backoff * 2, RETRY_MAX)

    def _keep(self, line: bytes) -> None:
        self._backlog.append(line)
        if len(self._backlog) > MAX_BACKLOG:
            del self._backlog[0]
            self.stats.dropped_records_total += 1
            if self.stats.dropped_records_total % 1000 == 1:
                log.error("history export: the disk has been failing too long; the oldest records are lost")

    def _repair_wal(self) -> None:
        """Start a new log file and move the records kept in memory into it."""
        self._try_open_wal()
        while self._wal is not None and self._backlog:
            try:
                self._wal.append(self._backlog[0])
            except OSError as exc:
                self._wal_failed(exc)
                return
            del self._backlog[0]
        if self._wal is not None:
            self._wal_backoff = RETRY_MIN
            log.warning("history export: the write-ahead log in %s is writable again", self.wal_dir)

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        known = {p for item in self._pending for p in item.paths}
        left = [
            _Pending(s.start, s.end, [s.path], writer=s.writer)
            for s in recover(self.wal_dir)
            if s.path not in known
        ]
        if left:
            log.info("history export: %d period(s) left by an earlier run are exported first", len(left))
        self._pending[:0] = left
        self._remove_stale_temps()
        while not self._stop.is_set():
            now = self.clock()
            with self._lock:
                if self._start != 0.0 and now >= self._end:
                    self._seal(now)
                    self._open_period(now)
                elif self._start != 0.0 and self._wal is None and now >= self._wal_retry_at:
                    self._repair_wal()
                wal = self._wal
            if wal is not None:
                with contextlib.suppress(OSError):
                    wal.sync()  # a power cut loses at most about a second of records
            if self._pending and now >= self._export_retry_at:
                self.export_pending()
            self._wake.clear()
            due = [self._end, now + 1.0]
            if self._pending:
                due.append(self._export_retry_at)
            self._wake.wait(max(min(due) - now, 0.01))

    def export_pending(self) -> bool:
        """Export the sealed periods, oldest first; True when none is left."""
        with self._export_lock:
            while self._pending:
                try:
                    self._export(self._pending[0])
                except OSError as exc:
                    self.stats.export_errors_total += 1
                    self._export_retry_at = self.clock() + self._export_backoff
                    log.error(
                        "history export: cannot write to %s (%s); %d period(s) waiting, retrying in %.0fs",
                        self.export_dir,
                        exc,
                        len(self._pending),
                        self._export_backoff,
                    )
                    self._export_backoff = min(self._export_backoff * 2, RETRY_MAX)
                    return False
                self._pending.pop(0)
                self._export_backoff = RETRY_MIN
            return True

    def _export(self, item: _Pending) -> None:
        parts = [(p, complete_length(p)) for p in item.paths if p.exists()]
        if any(length for _, length in parts) or item.backlog:
            name = period_name(item.start, item.end, item.writer)
            self.export_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            temp = self.export_dir / f".{name}.{_HOST}.{os.getpid()}.tmp"
            try:
                with open_private(temp) as out:
                    lines = sum(_copy(path, out, length) for path, length in parts)
                    out.writelines(item.backlog)
                    lines += len(item.backlog)
                    out.flush()
                    os.fsync(out.fileno())
                final = _publish(temp, self.export_dir, name)
            finally:
                with contextlib.suppress(OSError):
                    temp.unlink()
            self.stats.exported_records_total += lines
            self.stats.exported_files_total += 1
            self.stats.last_export_time = self.clock()
            log.info("history export: %d round(s) written to %s", lines, final)
        for path in item.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _remove_stale_temps(self) -> None:
        """Temporary files of exports that died: at once when written by a dead process of this host
        (replicas on other hosts may share the directory), else once they are STALE_TEMP old."""
        with contextlib.suppress(OSError):
            for temp in self.export_dir.glob(".history-*.tmp"):
                with contextlib.suppress(OSError):
                    if _writer_is_dead(temp) or time.time() - temp.stat().st_mtime > STALE_TEMP:
                        temp.unlink()
                        log.info("history export: removed %s, left by an export that died", temp.name)


_HOST = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in socket.gethostname())[:64] or "host"


def _writer_is_dead(temp: Path) -> bool:
    """`.<name>.<host>.<pid>.tmp` from this host, whose process is gone."""
    parts = temp.name.split(".")
    if len(parts) < 4 or parts[-3] != _HOST or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _copy(source: Path, out: BinaryIO, length: int) -> int:
    """Copy the first `length` bytes; the number of lines copied."""
    lines = 0
    with source.open("rb") as f:
        left = length
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                break
            out.write(block)
            lines += block.count(b"\n")
            left -= len(block)
    return lines


def _publish(temp: Path, directory: Path, name: str) -> Path:
    """Move `temp` to `name`, never over another file: an identical file there means this
    period was exported before a crash; a different one gets a `-<n>` suffix."""
    stem = name.removesuffix(".jsonl")
    for n in range(1000):
        final = directory / (name if n == 0 else f"{stem}-{n}.jsonl")
        try:
            os.link(temp, final)
        except FileExistsError:
            if _same_content(temp, final):
                return final
            continue
        except OSError:  # a file system without hard links
            if final.exists():
                if _same_content(temp, final):
                    return final
                continue
            os.replace(temp, final)
        _fsync_dir(directory)
        return final
    raise OSError(f"too many files named {stem}-*.jsonl in {directory}")


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            block = fa.read(CHUNK)
            if block != fb.read(CHUNK):
                return False
            if not block:
                return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
