"""Who asked: what a front end tells the serving layer about the caller, without its transport."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RequestInfo:
    """Per HTTP request or WebSocket connection; kept in the ASGI scope by the access log, which
    writes the token counts the serving layer adds here."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rounds: int = 0


@dataclass(frozen=True)
class Caller:
    """The request id, client address, session and arrival time of one call, and how to tell
    that the caller has gone away (polled while a whole answer is collected)."""

    info: RequestInfo | None = None  # the access log's counters; None for the WebUI
    client: str | None = None
    session: str | None = None  # a WebSocket connection or a WebUI browser tab
    arrived: float | None = None  # perf_counter at arrival; None: the round starts when called
    is_disconnected: Callable[[], Awaitable[bool]] | None = None

    @property
    def request_id(self) -> str | None:
        return self.info.request_id if self.info is not None else None
