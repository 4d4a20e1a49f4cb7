"""Replica log files: the last lines of each, and following them as they grow (`easllm logs -f`)."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

REPLICA_LOG = re.compile(r"replica-(\d+)\.log$")


def replica_logs(log_dir: Path, replica: int | None = None) -> list[Path]:
    """The log files of a service's replicas, oldest replica first."""
    if not log_dir.is_dir():
        return []
    found = []
    for path in log_dir.iterdir():
        match = REPLICA_LOG.search(path.name)
        if match and (replica is None or int(match.group(1)) == replica):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _label(path: Path, many: bool) -> str:
    return f"[{path.stem}] " if many else ""


def tail_lines(paths: list[Path], lines: int) -> str:
    out = []
    for path in paths:
        with path.open("rb") as f:
            last = deque(f, maxlen=lines)
        label = _label(path, len(paths) > 1)
        out += [label + raw.decode(errors="replace").rstrip("\n") for raw in last]
    return "\n".join(out) + ("\n" if out else "")


async def follow(
    log_dir: Path, replica: int | None, lines: int, still_wanted: Callable[[], bool], poll: float = 0.3
) -> AsyncIterator[bytes]:
    """The last `lines` lines, then new lines of every replica log (new replicas included) as they come."""
    paths = replica_logs(log_dir, replica)
    offsets = {p: p.stat().st_size for p in paths}  # before the tail: a line may repeat, none is lost
    if head := tail_lines(paths, lines).encode():
        yield head  # never an empty chunk: in chunked encoding that would end the response
    pending: dict[Path, bytes] = {}
    while still_wanted():
        await asyncio.sleep(poll)
        current = replica_logs(log_dir, replica)
        many = len(current) > 1
        for path in current:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            start = offsets.get(path, 0)
            if size < start:
                start = 0  # truncated or replaced
            if size == start:
                continue
            with path.open("rb") as f:
                f.seek(start)
                data = pending.pop(path, b"") + f.read(size - start)
            offsets[path] = size
            complete, _, rest = data.rpartition(b"\n")
            if rest:
                pending[path] = rest
            if complete:
                label = _label(path, many).encode()
                yield b"".join(label + line + b"\n" for line in complete.split(b"\n"))
