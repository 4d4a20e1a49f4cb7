"""Observation, done once by the serving layer for every front end: `RoundObserver.watch(deltas, ...)`.

It wraps an engine delta stream and, without changing what flows through it, measures time to
first token, inter-token latency, end-to-end latency and usage (metrics), adds the tokens to the
caller's access-log line, and when the stream ends writes the round to the history export.

A stream that ends without a finish reason (client gone, cancelled) is recorded as `abort`,
one that raises as `error`; a stream that failed before any text is not a round and is not
recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Histogram

from easllm.chat.template import Conversation
from easllm.engine.base import Engine
from easllm.engine.types import EngineHealth, FinishReason, GenerationRequest, TokenDelta, Usage
from easllm.errors import NotReady
from easllm.export.exporter import HistoryExporter
from easllm.export.record import RoundRecord
from easllm.serving.caller import Caller

log = logging.getLogger(__name__)


class ManyObservations(Protocol):
    def observe_many(self, api: str, values: Sequence[float]) -> None: ...


class RoundMetrics(Protocol):
    """The metric families a round updates (server/metrics.py's ServiceMetrics has them)."""

    @property
    def rounds(self) -> Counter: ...
    @property
    def prompt_tokens(self) -> Counter: ...
    @property
    def generation_tokens(self) -> Counter: ...
    @property
    def time_to_first_token(self) -> Histogram: ...
    @property
    def round_latency(self) -> Histogram: ...
    @property
    def inter_token_latency(self) -> ManyObservations: ...


class Progress:
    """When generated text last flowed; /ready uses it to tell a stuck engine from a busy one."""

    def __init__(self) -> None:
        self.last = time.perf_counter()  # perf_counter: the clock the round hook already reads

    def touch(self) -> None:
        self.last = time.perf_counter()


class RoundObserver:
    def __init__(
        self,
        service: str,
        engine: Engine,
        metrics: RoundMetrics,
        history: HistoryExporter | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.service = service
        self.engine = engine
        self.metrics = metrics
        self.history = history
        self.progress = progress or Progress()

    def watch(
        self,
        deltas: AsyncGenerator[TokenDelta, None],
        api: str,
        caller: Caller,
        conversation: Conversation | str,
        request: GenerationRequest,
        sources: Sequence[Any] = (),
        choice: int = 0,
    ) -> AsyncGenerator[TokenDelta, None]:
        """`deltas`, measured and recorded under `api` for `caller`."""
        conv = Conversation(conversation) if isinstance(conversation, str) else conversation
        round_ = _Round(self, api, caller, conv, request, [_source(s) for s in sources], choice)
        return round_.run(deltas)

    def model_name(self) -> str:
        try:
            return self.engine.model_info.name
        except NotReady:
            return self.engine.health().model


@dataclass
class _Round:
    observer: RoundObserver
    api: str
    caller: Caller
    conversation: Conversation
    request: GenerationRequest
    sources: list[Mapping[str, Any]]
    choice: int
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.caller.arrived is not None:
            self.started = self.caller.arrived  # HTTP: from the request's arrival

    async def run(self, deltas: AsyncGenerator[TokenDelta, None]) -> AsyncGenerator[TokenDelta, None]:
        m = self.observer.metrics
        ttft = m.time_to_first_token.labels(self.api)
        progress = self.observer.progress
        parts: list[str] = []
        gaps: list[float] = []  # inter-token latencies, observed at the end in one go
        first: float | None = None
        last = 0.0
        tokens = 0
        finish: str | None = None
        usage: Usage | None = None
        try:
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    if delta.text or delta.token_ids:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            ttft.observe(now - self.started)
                        else:
                            gaps.append(now - last)
                        last = now
                        progress.last = now
                    parts.append(delta.text)
                    tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        finish, usage = str(delta.finish_reason), delta.usage
                    yield delta
        except Exception:
            finish = finish or "error"
            raise
        finally:
            m.inter_token_latency.observe_many(self.api, gaps)
            if first is not None or finish not in (None, "error"):  # failed before any text: no round
                self._finish(finish or str(FinishReason.ABORT), "".join(parts), usage, tokens, first)

    def _finish(self, finish: str, text: str, usage: Usage | None, tokens: int, first: float | None) -> None:
        end = time.perf_counter()
        usage = usage or Usage(len(self.request.prompt_token_ids), tokens)
        m = self.observer.metrics
        m.rounds.labels(self.api, finish).inc()
        m.prompt_tokens.labels(self.api).inc(usage.prompt_tokens)
        m.generation_tokens.labels(self.api).inc(usage.completion_tokens)
        m.round_latency.labels(self.api).observe(end - self.started)
        info = self.caller.info
        if info is not None:
            info.prompt_tokens += usage.prompt_tokens
            info.completion_tokens += usage.completion_tokens
            info.rounds += 1
        history = self.observer.history
        if history is None:
            return
        try:
            line = RoundRecord(
                time=time.time(),
                service=self.observer.service,
                api=self.api,
                model=self.observer.model_name(),
                request_id=self.caller.request_id or self.request.request_id,
                session=self.caller.session,
                client=self.caller.client,
                conversation=self.conversation,
                response=text,
                sampling=self.request.sampling,
                usage=usage,
                latency=end - self.started,
                time_to_first_token=None if first is None else first - self.started,
                finish_reason=finish,
                sources=self.sources,
                choice=self.choice,
            ).to_line()
        except Exception:  # a record that cannot be built must not break the answer
            log.exception("history: could not build the record of a round")
            return
        history.record(line)


def _source(source: Any) -> Mapping[str, Any]:
    if is_dataclass(source) and not isinstance(source, type):
        return asdict(source)
    return dict(source)


class EngineWatch:
    """Tells a stuck engine from a busy one: with work queued, something must move (text flows,
    a request ends, a step runs) within `stall_after` seconds. Checked when /ready is asked."""

    def __init__(self, progress: Progress, stall_after: float = 120.0) -> None:
        self.progress = progress
        self.stall_after = stall_after
        self._counters: tuple[object, ...] = ()
        self._moved = time.perf_counter()
        self._busy = False

    def stalled_for(self, health: EngineHealth) -> float | None:
        """Seconds without progress while busy, once over `stall_after`; otherwise None."""
        now = time.perf_counter()
        counters = (health.finished_total, health.aborted_total, health.details.get("steps"))
        busy = health.running + health.waiting > 0
        if counters != self._counters or not self._busy:
            self._counters = counters
            self._moved = now
        self._busy = busy
        if not busy:
            return None
        idle = now - max(self._moved, self.progress.last)
        return idle if idle > self.stall_after else None
