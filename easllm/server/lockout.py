"""Slowing down token guessing, per client address, without ever delaying a right token.

A client that sent `FREE_FAILURES` wrong tokens within `WINDOW` seconds is slowed down: each
further wrong token is answered 401 only after a back-off (1 s, doubling per failure up to
`MAX_DELAY`), and at most `MAX_HELD` of its tokens are checked at a time; one more is answered
429 without being checked. So a guesser gets at most MAX_HELD / back-off tries a second, while a
right token is answered at once (unless the same address already has MAX_HELD checks under
way). Clients that have not failed are never touched. Used by the service API, its WebSocket and
WebUI login, the console's gateway and its admin API.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 10
WINDOW = 60.0
MAX_DELAY = 8.0
MAX_HELD = 2  # checks under way at once for a slowed-down client
MAX_CLIENTS = 4096  # the oldest records are forgotten first

OK, WRONG, BUSY = 200, 401, 429


@dataclass
class _Record:
    failures: int
    last: float
    held: int = 0


class FailedTokens:
    def __init__(
        self,
        free: int = FREE_FAILURES,
        window: float = WINDOW,
        max_delay: float = MAX_DELAY,
        max_held: int = MAX_HELD,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.window, self.max_delay, self.max_held = free, window, max_delay, max_held
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Record] = OrderedDict()

    def delay(self, client: str | None) -> float:
        """Seconds a wrong token of this client waits before its 401; 0 if it is not slowed down."""
        record = self._current(client)
        if record is None or record.failures < self.free:
            return 0.0
        return min(2.0 ** (record.failures - self.free), self.max_delay)

    def failed(self, client: str | None) -> None:
        key, now = client or "", self.clock()
        record = self._current(client) or _Record(0, now)
        record.failures += 1
        record.last = now
        self._clients[key] = record
        self._clients.move_to_end(key)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    async def check(self, client: str | None, right: Callable[[], bool]) -> int:
        """OK, WRONG (after the client's back-off) or BUSY (not checked: too many under way)."""
        record = self._current(client)
        if record is None or record.failures < self.free:
            if right():
                return OK
            self.failed(client)
            return WRONG
        if record.held >= self.max_held:
            return BUSY
        record.held += 1
        try:
            if right():
                return OK
            wait = self.delay(client)
            self.failed(client)
            await asyncio.sleep(wait)
            return WRONG
        finally:
            record.held -= 1

    def hold(self, client: str | None) -> bool:
        """Take one of a slowed-down client's check slots (False: none free); `release` gives it back."""
        record = self._current(client)
        if record is None or record.failures < self.free:
            return True
        if record.held >= self.max_held:
            return False
        record.held += 1
        return True

    def release(self, client: str | None) -> None:
        record = self._clients.get(client or "")
        if record is not None and record.held > 0:
            record.held -= 1

    def _current(self, client: str | None) -> _Record | None:
        record = self._clients.get(client or "")
        if record is not None and record.held == 0 and self.clock() - record.last > self.window:
            del self._clients[client or ""]
            return None
        return record


def busy_message(client_wait: float = 1.0) -> str:
    return f"too many wrong tokens from this client: retry in {client_wait:.0f} s"
