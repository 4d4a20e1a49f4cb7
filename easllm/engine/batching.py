"""Continuous batching: one engine thread runs `step()` while there is work, for every request.

Requests and aborts reach the thread through an inbox; each step schedules a batch, runs one
forward pass over it, samples a token per finished chunk and hands the new text to each
request's asyncio stream, one hop per event loop per step. A backend supplies `_load`, which
returns the model's info and its ModelRunner, and `tokenize`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator

from easllm.config import EngineConfig
from easllm.engine.base import EngineError, EngineOverloaded
from easllm.engine.prefix_cache import PrefixCache
from easllm.engine.runner import KVCacheFull, ModelRunner
from easllm.engine.sampler import Sampler
from easllm.engine.scheduler import Scheduler, SchedulerConfig
from easllm.engine.sequence import Sequence
from easllm.engine.stream import Item, Stream, put_all
from easllm.engine.types import EngineHealth, FinishReason, GenerationRequest, ModelInfo, TokenDelta
from easllm.errors import InvalidRequest, NotReady

log = logging.getLogger(__name__)


class BatchingEngine(ABC):
    name = "batching"

    def __init__(self, display_name: str, config: EngineConfig) -> None:
        self.display_name = display_name
        self.config = config
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self._info: ModelInfo | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._inbox: list[Sequence | str] = []  # new sequences, and request ids to abort
        self._streams: dict[str, Stream] = {}
        self._closing = False
        # written by the engine thread after each step, read by health()
        self._running = 0
        self._waiting = 0
        self._kv_used = 0
        self._kv_cached = 0  # of those, cells only cached prefixes hold
        self._aborted = 0
        self._finished = 0
        self._steps = 0

    # -- what a backend implements --
    @abstractmethod
    def _load(self) -> tuple[ModelInfo, ModelRunner]:
        """Load the model (on a worker thread); `context_length` is the per-sequence context."""

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
        self.attach(*await asyncio.to_thread(self._load))
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        with self._cond:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(NotReady("the server is shutting down"))  # the client still waits: 503
        if self.scheduler is not None:  # frees their grammars while the model still exists
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self.scheduler.abort(seq.request_id)
        if self.runner is not None:
            self.runner.close()

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._thread is None or self._closing:
            raise NotReady("the model is still loading")
        seq = self.sequence(req)
        stream = Stream()
        with self._cond:
            queued = self._waiting + sum(isinstance(i, Sequence) for i in self._inbox)
            if queued >= self.config.max_queue or req.request_id in self._streams:
                seq.sampler.close()
                if queued >= self.config.max_queue:
                    raise EngineOverloaded("the engine queue is full")
                raise InvalidRequest(f"request id {req.request_id} is already running", "request_id")
            self._streams[req.request_id] = stream
            self._inbox.append(seq)
            self._cond.notify()
        async with contextlib.aclosing(stream.deltas(lambda: self.abort(req.request_id))) as deltas:
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(request_id)
            self._cond.notify()

    def health(self) -> EngineHealth:
        runner = self.runner
        with self._cond:
            queued = sum(isinstance(i, Sequence) for i in self._inbox)
        details: dict[str, object] = {}
        if runner is not None:
            scheduler = self.scheduler
            details = {
                "kv_cells_used": self._kv_used,
                "kv_cells_cached": self._kv_cached,
                "kv_cells_total": runner.kv_cells,
                "prefix_cache": bool(scheduler and scheduler.cache.enabled),
                "prefix_cache_queries_total": scheduler.prefix_queries_total if scheduler else 0,
                "prefix_cache_hits_total": scheduler.prefix_hits_total if scheduler else 0,
                "max_batch": runner.max_seqs,
                "max_batch_tokens": runner.max_batch_tokens,
                "context_per_sequence": self._info.context_length if self._info else None,
                "preempted_total": self.scheduler.preempted_total if self.scheduler else 0,
                "steps": self._steps,
            }
        return EngineHealth(
            ready=self._thread is not None and not self._closing,
            engine=self.name,
            model=self.display_name,
            running=self._running,
            waiting=self._waiting + queued,
            aborted_total=self._aborted,
            finished_total=self._finished,
            details=details,
        )

    def attach(self, info: ModelInfo, runner: ModelRunner) -> None:
        """Take a loaded model. `start` calls it; tests call it to drive `step()` by hand."""
        self.runner = runner
        config = SchedulerConfig(runner.max_seqs, runner.max_batch_tokens, runner.kv_cells)
        cache = PrefixCache(runner, runner.kv_cells, runner.max_seqs, self.config.prefix_cache)
        self.scheduler = Scheduler(config, cache)
        self._info = info

    def sequence(self, req: GenerationRequest) -> Sequence:
        """Check a request against the model and build its Sequence (sampler, grammar, stops)."""
        assert self.runner is not None and self._info is not None
        prompt = req.prompt_token_ids
        max_len = self._info.context_length
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(prompt) >= max_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; the context holds {max_len} with the answer", "prompt"
            )
        vocab_size = self.runner.vocab.size
        if not all(0 <= t < vocab_size for t in prompt):
            raise InvalidRequest(f"token ids must be in [0, {vocab_size})", "prompt")
        s = req.sampling
        grammar = self.runner.grammar(s.grammar, s.grammar_triggers) if s.grammar else None
        sampler = Sampler(req.sampling, prompt, grammar)
        return Sequence(req, sampler, self.runner.vocab, max_len)

    # -- the engine thread --
    def step(self) -> list[TokenDelta]:
        assert self.scheduler is not None and self.runner is not None
        batch = self.scheduler.schedule()  # decode tokens, then prefill chunks
        logits = self.runner.run(batch)  # one forward pass over the whole batch
        samples = [seq.sampler.sample(row) for seq, row in zip(batch.sampled, logits, strict=True)]
        return self.scheduler.update(batch, samples)  # append, stop, finish, free KV cells

    def _loop(self) -> None:
        assert self.scheduler is not None
        while self._take_inbox():
            if not self.scheduler.has_work():
                continue
            deltas: list[TokenDelta] = []
            try:
                deltas = self.step()
                self._steps += 1
            except KVCacheFull:
                if not self.scheduler.make_room():
                    self._fail_running(EngineError("the KV cache cannot hold this sequence"))
            except Exception as exc:  # a failed forward pass ends the running requests, not the engine
                log.exception("engine step failed")
                self._fail_running(EngineError(f"generation failed: {exc}"))
            self._publish()  # before the deltas: a client that sees its last delta sees its cells freed
            self._deliver(deltas)

    def _take_inbox(self) -> bool:
        """Wait for work; apply new sequences and aborts. False when the engine closes."""
        assert self.scheduler is not None
        with self._cond:
            while not (self._inbox or self._closing or self.scheduler.has_work()):
                self._publish()
                self._cond.wait()
            items, self._inbox = self._inbox, []
            if self._closing:
                return False
        aborted = []
        for item in items:
            if isinstance(item, Sequence):
                self.scheduler.add(item)
            elif (delta := self.scheduler.abort(item)) is not None:
                self._aborted += 1
                log.info("request %s aborted", item)
                aborted.append(delta)
        self._publish()
        self._deliver(aborted)
        return True

    def _publish(self) -> None:
        assert self.scheduler is not None and self.runner is not None
        self._running = len(self.scheduler.running)
        self._waiting = len(self.scheduler.waiting)
        self._kv_used = self.scheduler.cache.cells_used
        self._kv_cached = self.scheduler.cache.cells_cached

    def _deliver(self, items: list[TokenDelta]) -> None:
        ready: list[tuple[Stream, Item]] = []
        with self._cond:
            for delta in items:
                if delta.finish_reason is None:
                    stream = self._streams.get(delta.request_id)
                else:
                    stream = self._streams.pop(delta.request_id, None)
                    self._finished += int(delta.finish_reason is not FinishReason.ABORT)
                if stream is not None:
                    ready.append((stream, delta))
        put_all(ready)

    def _fail_running(self, error: EngineError) -> None:
        assert self.scheduler is not None
        for seq in list(self.scheduler.running):
            self.scheduler.fail(seq)
            with self._cond:
                stream = self._streams.pop(seq.request_id, None)
            if stream is not None:
                stream.put(error)
