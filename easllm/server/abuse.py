"""Slowing down a client whose requests keep being refused, per client address (issue 16).

`lockout.py`'s idea for every refusal: a request is cheap to refuse, but a client that sends
nothing else (50,000-deep JSON, 100,000 stop strings, a WebSocket flooded past its queue) as fast
as the server answers takes a core away from everyone else. So each address has a token bucket
(`--abuse-rate` a second, `--abuse-burst` deep) that only *refusals* drain:

- every 4xx answer but 401 (lockout.py has those) and 429 (the server's own overload or lockout)
  costs 1 + 1 per MB of body the client sent with it; so does, on a WebSocket, an error reply
  (`{"error": ...}` with a 4xx code) or a close for policy or size (1008, 1009): its cost counts
  the bytes received since the last reply;
- while the bucket has tokens nothing waits. A client in debt has its next requests (and its
  WebSocket handshakes) **delayed** until the debt is paid, one ticket each, so a closed-loop
  attacker gets `--abuse-rate` refusals a second; at most `MAX_HELD` of its requests wait at once,
  one more is answered 429 with `Retry-After` (and costs a token: ignoring it keeps the client
  in debt). An open WebSocket of a client in debt has its reader wait before each message, so the
  client's sends stall on TCP back-pressure instead of queueing;
- a delayed request gets its ticket back when it is answered (a refusal pays its own cost).

A client whose requests succeed never has a bucket, so it is never delayed however fast it goes,
and a flood of addresses cannot grow memory without bound: at most `MAX_CLIENTS` buckets, the
least recently used forgotten first; a bucket that has refilled is dropped. Probes are not counted.

The address is the ASGI client: uvicorn already replaces it with `X-Forwarded-For` when the peer
is a trusted proxy (`FORWARDED_ALLOW_IPS`, loopback by default), which is how the console's gateway
forwards each client's own address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import islice

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easllm.config import LimitsConfig
from easllm.server.limits import MB, PROBES, app_path, send_error

log = logging.getLogger(__name__)

MAX_CLIENTS = 4096  # buckets kept; the least recently used is forgotten first
MAX_HELD = 8  # requests of one client delayed at once; one more gets 429
MAX_WAIT = 10.0  # the longest delay: the debt a bucket can reach is rate x MAX_WAIT tokens
NOT_COUNTED = frozenset({401, 429})
WS_COUNTED_CLOSES = frozenset({1008, 1009})
CLOSE_POLICY = 1008


def is_refusal(status: int) -> bool:
    """A 4xx the client earned (not a 401, which lockout.py slows down, nor the server's own 429)."""
    return 400 <= status < 500 and status not in NOT_COUNTED


@dataclass
class _Bucket:
    tokens: float
    updated: float
    held: int = 0
    in_flight: int = 0  # requests admitted and not yet answered: refusals not yet charged


class RefusalBudget:
    """Per-client token buckets drained by refusals; `admit` waits while a client is in debt."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_held: int = MAX_HELD,
        max_wait: float = MAX_WAIT,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate, self.burst, self.max_held = rate, float(burst), max_held
        self.floor = -rate * max_wait
        self.max_clients = max_clients
        self.clock, self.sleep = clock, sleep
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def from_config(cls, limits: LimitsConfig) -> RefusalBudget | None:
        """None when `--abuse-rate` or `--abuse-burst` is 0: nothing is counted or delayed."""
        if not (0 < limits.abuse_rate < math.inf) or limits.abuse_burst <= 0:  # nan, inf: off too
            return None
        return cls(limits.abuse_rate, limits.abuse_burst)

    def __len__(self) -> int:
        return len(self._buckets)

    def tokens(self, client: str) -> float:
        bucket = self._current(client)
        return self.burst if bucket is None else bucket.tokens

    def wait(self, client: str) -> float:
        """Seconds until this client is out of debt (0 when it is not in debt)."""
        return max(-self.tokens(client), 0.0) / self.rate

    def charge(self, client: str, cost: float) -> None:
        bucket = self._current(client)
        if bucket is None:
            for oldest in list(islice(self._buckets, 2)):  # forget refilled buckets as new ones come
                self._current(oldest)
            bucket = _Bucket(self.burst, self.clock())
            self._buckets[client] = bucket
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(client)
        bucket.tokens = max(bucket.tokens - cost, self.floor)

    async def admit(self, client: str) -> bool:
        """True at once for a client not in debt; otherwise after its debt plus one ticket is paid
        (`refund` gives the ticket back); False, at once, when MAX_HELD of its requests wait."""
        bucket = self._current(client)
        if bucket is None or bucket.tokens - bucket.in_flight >= 0:
            return True
        if bucket.held >= self.max_held:
            return False
        self.charge(client, 1.0)
        bucket.held += 1
        try:
            await self.sleep(-bucket.tokens / self.rate)
        finally:
            bucket.held -= 1
        return True

    def begin(self, client: str) -> None:
        """A request of a client with a bucket is under way: the next ones count it as a refusal to come,
        so a burst of concurrent requests cannot all pass before the first is charged."""
        bucket = self._buckets.get(client)
        if bucket is not None:
            bucket.in_flight += 1

    def end(self, client: str) -> None:
        bucket = self._buckets.get(client)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def refund(self, client: str) -> None:
        bucket = self._buckets.get(client)
        if bucket is not None:
            bucket.tokens = min(bucket.tokens + 1.0, self.burst)

    def _current(self, client: str) -> _Bucket | None:
        """The client's bucket refilled to now; None (and forgotten) once it is full again."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return None
        now = self.clock()
        bucket.tokens = min(bucket.tokens + (now - bucket.updated) * self.rate, self.burst)
        bucket.updated = now
        if bucket.tokens >= self.burst and bucket.held == 0 and bucket.in_flight == 0:
            del self._buckets[client]
            return None
        return bucket


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def refusal_cost(received: int) -> float:
    return 1.0 + received / MB


class AbuseThrottle:
    """The ASGI middleware over the whole app: it counts refusals and delays clients in debt."""

    def __init__(self, app: ASGIApp, budget: RefusalBudget | None) -> None:
        self.app = app
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        budget = self.budget
        if budget is None or scope["type"] not in ("http", "websocket") or app_path(scope) in PROBES:
            await self.app(scope, receive, send)
            return
        client = client_of(scope)
        delayed = budget.wait(client) > 0
        if not await budget.admit(client):
            budget.charge(client, 1.0)
            await self._too_many(scope, send, budget.wait(client))
            return
        if scope["type"] == "websocket":
            try:
                await _Socket(self.app, budget, client).run(scope, receive, send)
            finally:
                if delayed:  # the ticket back: a refusal paid its own cost, a success costs nothing
                    budget.refund(client)
            return
        budget.begin(client)
        try:
            await self._http(scope, receive, send, budget, client)
        finally:
            budget.end(client)
            if delayed:
                budget.refund(client)

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, budget: RefusalBudget, client: str
    ) -> None:
        received = 0
        status = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        finally:
            if is_refusal(status):
                budget.charge(client, refusal_cost(received))

    async def _too_many(self, scope: Scope, send: Send, wait: float) -> None:
        retry = max(math.ceil(wait), 1)
        text = f"too many refused requests from this client: retry in {retry} s (--abuse-rate)"
        log.debug("throttled %s: %s", client_of(scope), text)  # the access log has a line per request
        if scope["type"] == "http":
            await send_error(send, 429, text, None, retry_after=retry, close=True)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send_error(send, 429, text, None, prefix="websocket.", retry_after=retry)
        else:
            await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": "too many refusals"})


class _Socket:
    """One WebSocket: its error replies and policy closes are charged; the reader waits while the
    client is in debt."""

    def __init__(self, app: ASGIApp, budget: RefusalBudget, client: str) -> None:
        self.app, self.budget, self.client = app, budget, client
        self.received = 0  # bytes since the last reply: what an error reply or a close is charged for

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def throttled_receive() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                self.received += len(message.get("bytes") or b"") + len(message.get("text") or "")
                if self.budget.wait(self.client) > 0:  # no cap: one reader per connection waits
                    await self.budget.sleep(self.budget.wait(self.client))
            return message

        async def watching_send(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.send":
                self._replied(_error_code(message.get("text")))
            elif kind == "websocket.close":
                self._replied(0 if message.get("code", 1000) not in WS_COUNTED_CLOSES else 400)
            elif kind == "websocket.http.response.start":
                self._replied(message["status"])
            await send(message)

        await self.app(scope, throttled_receive, watching_send)

    def _replied(self, status: int) -> None:
        if is_refusal(status):
            self.budget.charge(self.client, refusal_cost(self.received))
        self.received = 0


def _error_code(text: str | None) -> int:
    """The code of an error reply (`{"error": {..., "code": 400}}`); 0 for anything else."""
    if not text or not text.startswith('{"error"') or len(text) > 64 * 1024:
        return 0
    try:
        code = json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return 0
    return code if isinstance(code, int) else 0
