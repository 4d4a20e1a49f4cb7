"""The history exporter: write-ahead log, periods, atomic files, crash recovery, disk errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from easllm.export import wal as wal_module
from easllm.export.exporter import HistoryExporter, period_name
from easllm.export.wal import WalFile, complete_length, recover

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a multiple of every interval used here


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def line(n: int) -> bytes:
    return json.dumps({"n": n, "prompt": f"question {n}"}).encode() + b"\n"


def exported(directory: Path) -> dict[str, list[int]]:
    """{file name: [n of each record]} of the export files (temporary files excluded)."""
    out = {}
    for path in sorted(directory.glob("history-*.jsonl")):
        out[path.name] = [json.loads(x)["n"] for x in path.read_text().splitlines()]
    return out


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "export", tmp_path / "wal"


def exporter(dirs: tuple[Path, Path], clock: Clock, interval: float = 60.0) -> HistoryExporter:
    return HistoryExporter(dirs[0], dirs[1], interval, clock=clock)


def test_a_record_is_in_the_write_ahead_log_as_soon_as_record_returns(dirs: tuple[Path, Path]) -> None:
    h = exporter(dirs, Clock(T0 + 5))
    h.record(line(1))
    h.record(line(2))
    (wal,) = dirs[1].glob("open-*.jsonl")
    assert wal.read_bytes() == line(1) + line(2)  # no buffering in the process: a kill -9 loses nothing
    assert not dirs[0].exists()  # nothing exported before the period ends


def test_periods_end_on_multiples_of_the_interval_and_are_named_by_them(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0 + 10)  # the first period starts with the server, mid-interval
    h = exporter(dirs, clock, interval=60)
    h.record(line(1))
    clock.now = T0 + 59.9
    h.record(line(2))
    clock.now = T0 + 60.0  # boundary: the next record opens a new period
    h.record(line(3))
    clock.now = T0 + 200  # two empty periods skipped: no files for them
    h.record(line(4))
    assert h.export_pending()
    assert exported(dirs[0]) == {
        "history-20260101T000010Z-20260101T000100Z.jsonl": [1, 2],
        "history-20260101T000100Z-20260101T000200Z.jsonl": [3],
    }
    assert h.close()
    assert exported(dirs[0])["history-20260101T000320Z-20260101T000320Z.jsonl"] == [4]
    assert list(dirs[1].iterdir()) == []  # logs are deleted once exported
    assert [p.name for p in dirs[0].iterdir() if not p.name.startswith("history-")] == []  # no temp files
    assert h.stats.exported_records_total == 4 and h.stats.exported_files_total == 3


def test_close_exports_the_open_period_and_an_empty_period_makes_no_file(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.start()
    clock.now = T0 + 2
    h.record(line(1))
    clock.now = T0 + 3.5
    assert h.close()
    assert exported(dirs[0]) == {"history-20260101T000001Z-20260101T000004Z.jsonl": [1]}

    quiet = (dirs[0].parent / "e2", dirs[0].parent / "w2")
    h2 = exporter(quiet, clock)
    h2.start()
    assert h2.close()
    assert not quiet[0].exists() or exported(quiet[0]) == {}
    assert list(quiet[1].iterdir()) == []  # the empty log was dropped


def test_the_worker_exports_each_period_after_it_ends(dirs: tuple[Path, Path]) -> None:
    """The real clock and the worker thread: a 0.2 s period is exported without anyone asking."""
    h = HistoryExporter(dirs[0], dirs[1], 0.2)
    h.start()
    try:
        h.record(line(1))
        deadline = time.monotonic() + 10
        while not exported(dirs[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(exported(dirs[0]).values()) == [[1]]
    finally:
        h.close()


def test_records_of_a_killed_process_are_exported_at_the_next_start(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0 + 30)
    dead = exporter(dirs, clock)
    dead.record(line(1))
    dead.record(line(2))
    (wal,) = dirs[1].glob("open-*.jsonl")
    with wal.open("ab") as f:
        f.write(b'{"n": 3, "torn')  # a write cut short: never exported
    os.utime(wal, (T0 + 45, T0 + 45))
    assert dead._wal is not None
    dead._wal.close()  # what the kernel does to a killed process: the fd and its flock are gone

    clock.now = T0 + 3600
    h = exporter(dirs, clock)
    h.start()
    assert h.close()
    # the period ends at the log's last write
    assert exported(dirs[0]) == {"history-20260101T000030Z-20260101T000045Z.jsonl": [1, 2]}
    assert list(dirs[1].iterdir()) == []


def test_the_log_of_a_live_process_is_left_alone(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0)
    alive = exporter(dirs, clock)
    alive.record(line(1))
    assert recover(dirs[1]) == []  # its flock is held: not a dead process's log
    assert len(list(dirs[1].glob("open-*.jsonl"))) == 1
    alive.close()


def test_a_crash_after_the_rename_does_not_export_a_round_twice(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.record(line(1))
    h.record(line(2))
    with h._lock:
        h._seal(T0 + 2)
    (sealed,) = dirs[1].glob("sealed-*.jsonl")
    keep = sealed.read_bytes()
    assert h.export_pending()
    sealed.write_bytes(keep)  # as if the process died before deleting the log

    again = exporter(dirs, Clock(T0 + 100))
    again.start()
    assert again.close()
    assert exported(dirs[0]) == {"history-20260101T000001Z-20260101T000002Z.jsonl": [1, 2]}


def test_an_export_never_overwrites_a_different_file(dirs: tuple[Path, Path]) -> None:
    dirs[0].mkdir()
    name = period_name(T0, T0 + 60)
    (dirs[0] / name).write_bytes(line(99))  # another replica exported the same period
    clock = Clock(T0)
    h = exporter(dirs, clock)
    h.record(line(1))
    clock.now = T0 + 60
    assert h.close()
    assert exported(dirs[0]) == {name: [99], name.replace(".jsonl", "-1.jsonl"): [1]}


def test_an_unwritable_export_directory_is_retried_and_serving_goes_on(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    dirs[0].parent.mkdir(exist_ok=True)
    dirs[0].write_text("not a directory")  # the mount went away and something else is there
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.record(line(1))
    clock.now = T0 + 61
    h.record(line(2))  # the period ended: its export fails, recording goes on
    assert not h.export_pending()
    assert h.stats.export_errors_total == 1
    assert any(r.levelname == "ERROR" and "cannot write to" in r.getMessage() for r in caplog.records)
    assert h.pending_periods == 1
    dirs[0].unlink()  # the disk is back
    assert h.export_pending()
    assert h.close()
    assert sorted(exported(dirs[0]).values()) == [[1], [2]]


def test_an_export_that_fails_at_shutdown_stays_for_the_next_start(dirs: tuple[Path, Path]) -> None:
    dirs[0].parent.mkdir(exist_ok=True)
    dirs[0].write_text("not a directory")
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.record(line(1))
    assert not h.close(timeout=0.1)
    assert len(list(dirs[1].glob("sealed-*.jsonl"))) == 1  # still on local disk
    dirs[0].unlink()
    again = exporter(dirs, Clock(T0 + 5000))
    again.start()
    assert again.close()
    assert list(exported(dirs[0]).values()) == [[1]]


def test_a_full_disk_mid_write_keeps_the_record_in_memory_and_exports_it_once(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.record(line(1))
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 10:
            real_write(fd, data[:10])
            monkeypatch.setattr(wal_module.os, "write", full)
            return 10
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_module.os, "write", half_then_full)
    h.record(line(2))  # ten bytes reach the file, then the disk is full: they are cut off again
    h.record(line(3))  # the log is broken: kept in memory
    assert h.stats.wal_errors_total == 1
    (wal,) = dirs[1].glob("open-*.jsonl")
    assert wal.read_bytes() == line(1)
    monkeypatch.setattr(wal_module.os, "write", real_write)
    with h._lock:
        h._repair_wal()  # the worker's retry: a new log file takes the records kept in memory
    assert sorted(p.read_bytes() for p in dirs[1].glob("open-*.jsonl")) == sorted(
        [line(1), line(2) + line(3)]
    )
    h.record(line(4))
    assert h.close()
    assert list(exported(dirs[0]).values()) == [[1, 2, 3, 4]]


def test_a_log_directory_that_cannot_be_created_keeps_records_in_memory(dirs: tuple[Path, Path]) -> None:
    dirs[1].parent.mkdir(exist_ok=True)
    dirs[1].write_text("not a directory")
    h = exporter(dirs, Clock(T0 + 1))
    h.record(line(1))
    h.record(line(2))
    assert h.stats.wal_errors_total >= 1
    assert h.close()  # the export itself works: the records go straight from memory
    assert list(exported(dirs[0]).values()) == [[1, 2]]


def test_a_record_after_close_waits_in_a_log_for_the_next_start(dirs: tuple[Path, Path]) -> None:
    clock = Clock(T0 + 1)
    h = exporter(dirs, clock)
    h.start()
    assert h.close()
    h.record(line(7))  # a round that finished during shutdown
    assert len(list(dirs[1].glob("open-*.jsonl"))) == 1
    assert h._wal is not None
    h._wal.close()  # the process exits
    again = exporter(dirs, Clock(T0 + 100))
    again.start()
    assert again.close()
    assert list(exported(dirs[0]).values()) == [[7]]


def test_complete_length_leaves_out_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c"')
    assert complete_length(path) == len(b'{"a": 1}\n{"b": 2}\n')
    path.write_bytes(b'{"c"')
    assert complete_length(path) == 0


def test_two_logs_of_one_directory_do_not_share_a_file(tmp_path: Path) -> None:
    a, b = WalFile(tmp_path, T0), WalFile(tmp_path, T0)
    a.append(line(1))
    b.append(line(2))
    assert a.path != b.path and a.path.read_bytes() == line(1)
    a.close()
    b.close()


def test_period_name_is_utc_and_covers_the_period() -> None:
    assert period_name(T0 + 0.7, T0 + 3599.2) == "history-20260101T000000Z-20260101T010000Z.jsonl"


def test_a_non_positive_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        HistoryExporter(tmp_path, tmp_path, 0)


def test_stale_temporary_files_are_removed_at_start(dirs: tuple[Path, Path]) -> None:
    dirs[0].mkdir(parents=True)
    stale = dirs[0] / ".history-x.jsonl.1.tmp"
    fresh = dirs[0] / ".history-y.jsonl.2.tmp"
    stale.write_text("x")
    fresh.write_text("y")
    os.utime(stale, (0, 0))
    h = exporter(dirs, Clock(T0))
    h.start()
    h.close()
    assert not stale.exists() and fresh.exists()
    shutil.rmtree(dirs[0])


def test_replicas_sharing_a_service_export_their_own_files_and_every_round_once(
    dirs: tuple[Path, Path],
) -> None:
    """Two replicas record the same period; one is killed, the other stopped (a rolling update);
    the new replica exports what the killed one left, under the killed one's name."""
    clock = Clock(T0 + 10)
    old_a = HistoryExporter(dirs[0], dirs[1], 60.0, clock=clock, replica="replica-1")
    old_b = HistoryExporter(dirs[0], dirs[1], 60.0, clock=clock, replica="replica-2")
    for n in range(1, 7):
        (old_a if n % 2 else old_b).record(line(n))
    assert old_a._wal is not None
    old_a._wal.close()  # replica 1 is killed: its log stays, unlocked
    os.utime(old_a._wal.path, (T0 + 15, T0 + 15))  # its last write
    clock.now = T0 + 20
    assert old_b.close()  # replica 2 is stopped: it exports its own rounds
    new = HistoryExporter(dirs[0], dirs[1], 60.0, clock=Clock(T0 + 30), replica="replica-3")
    new.start()
    new.record(line(7))
    assert new.close()
    files = exported(dirs[0])
    assert files == {
        "history-20260101T000010Z-20260101T000015Z-replica-1.jsonl": [1, 3, 5],
        "history-20260101T000010Z-20260101T000020Z-replica-2.jsonl": [2, 4, 6],
        "history-20260101T000030Z-20260101T000030Z-replica-3.jsonl": [7],
    }
    assert sorted(n for ns in files.values() for n in ns) == list(range(1, 8))
    assert list(dirs[1].iterdir()) == []


def test_the_replica_name_is_in_the_log_and_the_export_name() -> None:
    assert period_name(T0, T0 + 60, "replica-7").endswith("Z-replica-7.jsonl")
    assert wal_module.writer_of("replica-7-1234-abcdef12") == "replica-7"
    assert wal_module.writer_of("ray-a_b-9-abcdef12") == "ray-a_b"
    assert wal_module.writer_of("1234-abcdef12") == ""
