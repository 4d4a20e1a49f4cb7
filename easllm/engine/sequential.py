"""Base for backends that decode one request at a time on a worker thread, in arrival order.

The backend supplies `_load` and `_generate_tokens`; this class owns the queue, abort flags,
stop strings, usage counting and the hop from the worker thread to the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

from easllm.engine.base import EngineError, EngineOverloaded
from easllm.engine.stop import StopMatcher
from easllm.engine.types import (
    EngineHealth,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    TokenDelta,
    Usage,
)
from easllm.errors import NotReady

log = logging.getLogger(__name__)


@dataclass
class _Job:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[TokenDelta | BaseException]

    def emit(self, item: TokenDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class SequentialEngine(ABC):
    name = "sequential"

    def __init__(self, display_name: str, max_queue: int = 256) -> None:
        self.display_name = display_name
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._cancelled: set[str] = set()
        self._live: set[str] = set()  # queued or running: only these can be aborted
        self._lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._running = 0
        self._aborted = 0
        self._finished = 0

    # -- what a backend implements (called on the worker thread) --
    @abstractmethod
    def _load(self) -> ModelInfo: ...

    @abstractmethod
    def _generate_tokens(self, req: GenerationRequest) -> Generator[tuple[int, str], None, None]:
        """Yield (token id, its text) until end of sequence; the caller stops it early."""

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    # -- the Engine interface --
    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise NotReady("the model is still loading")
        return self._info

    async def start(self) -> None:
        self._closing = False  # an app may run its lifespan again (tests do): the engine starts afresh
        self._info = await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._worker, name=f"{self.name}-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._closing = True  # the running request stops at its next token
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._thread is None:
            raise NotReady("the model is still loading")
        job = _Job(req, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._live.add(req.request_id)
        try:
            self._jobs.put_nowait(job)
        except queue.Full as exc:
            with self._lock:
                self._live.discard(req.request_id)
            raise EngineOverloaded("the engine queue is full") from exc
        finished = False
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                await self.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._live:  # a finished request's id would stay in the set for ever
                self._cancelled.add(request_id)

    def health(self) -> EngineHealth:
        return EngineHealth(
            ready=self._thread is not None,
            engine=self.name,
            model=self.display_name,
            running=self._running,
            waiting=self._jobs.qsize(),
            aborted_total=self._aborted,
            finished_total=self._finished,
        )

    # -- the worker thread --
    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return self._closing or request_id in self._cancelled

    def _worker(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._running = 1
            try:
                self._serve(job)
            except Exception as exc:  # a decode failure ends this request, not the engine
                log.exception("generation failed for %s", job.req.request_id)
                job.emit(EngineError(f"generation failed: {exc}"))
            finally:
                self._running = 0
                with self._lock:
                    self._live.discard(job.req.request_id)
                    self._cancelled.discard(job.req.request_id)

    def _tell_if_closing(self, job: _Job) -> None:
        """A request stopped by close(), not by its client: the client still waits for an answer."""
        if self._closing:
            with contextlib.suppress(RuntimeError):  # the client's event loop is already gone
                job.emit(NotReady("the server is shutting down"))

    def _serve(self, job: _Job) -> None:
        req = job.req
        sampling = req.sampling
        stops = StopMatcher(sampling.stop)
        count = 0
        reason = FinishReason.STOP
        if self._is_cancelled(req.request_id):
            self._aborted += 1
            self._tell_if_closing(job)
            return
        tokens = self._generate_tokens(req)
        try:
            for token_id, piece in tokens:
                if self._is_cancelled(req.request_id):
                    self._aborted += 1
                    log.info("request %s aborted after %d tokens", req.request_id, count)
                    self._tell_if_closing(job)
                    return
                count += 1
                text = stops.push(piece)
                if text:
                    job.emit(TokenDelta(req.request_id, text, [token_id]))
                if stops.stopped:
                    break
                if count >= sampling.max_new_tokens:
                    reason = FinishReason.LENGTH
                    break
        finally:
            tokens.close()
        self._finished += 1
        usage = Usage(len(req.prompt_token_ids), count)
        job.emit(TokenDelta(req.request_id, stops.flush(), [], reason, usage))
