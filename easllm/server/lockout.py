"""Slowing down token guessing: a client (by address) that sends `FREE_FAILURES` wrong tokens
within `WINDOW` seconds is refused with 429 for a while, doubling with each further failure up to
`MAX_LOCK` seconds, without its token being checked. A client that has not failed is never
delayed, and one correct token clears a client's record. Used by the service API, its WebSocket
and WebUI login, the console's gateway and its admin API.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 10
WINDOW = 60.0
MAX_LOCK = 300.0
MAX_CLIENTS = 4096  # the oldest records are forgotten first


@dataclass
class _Record:
    failures: int
    first: float
    locked_until: float = 0.0


class FailedTokens:
    def __init__(
        self,
        free: int = FREE_FAILURES,
        window: float = WINDOW,
        max_lock: float = MAX_LOCK,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.window, self.max_lock, self.max_clients = free, window, max_lock, max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Record] = OrderedDict()

    def locked_for(self, client: str | None) -> float:
        """Seconds this client must still wait; 0 when it may try a token now."""
        record = self._clients.get(client or "")
        return max(record.locked_until - self.clock(), 0.0) if record else 0.0

    def failed(self, client: str | None) -> None:
        key, now = client or "", self.clock()
        record = self._clients.get(key)
        if record is None or (now - record.first > self.window and record.locked_until < now):
            record = _Record(0, now)
        record.failures += 1
        if record.failures >= self.free:
            record.locked_until = now + min(2.0 ** (record.failures - self.free), self.max_lock)
        self._clients[key] = record
        self._clients.move_to_end(key)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def succeeded(self, client: str | None) -> None:
        self._clients.pop(client or "", None)


def lockout_message(seconds: float) -> str:
    return f"too many wrong tokens from this client: retry in {seconds:.0f} s"
