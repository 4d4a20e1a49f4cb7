"""Hugging Face transformers with continuous batching: transformers' own ContinuousBatchingManager.

The manager runs the model on its own thread over a paged KV cache: requests join and leave
the running batch at every step. Its sampling settings are fixed when it starts, except the
per-request temperature, top-k and top-p of its per-request logits processors; greedy decoding
is top-k 1. A request that needs what the manager cannot do per request (a seed for sampling,
a repetition penalty) goes to the sequential transformers engine, which shares the loaded model
and runs beside it, so every request is answered as it asked.

A reader thread takes the manager's outputs (the tokens so far, per request), turns the new
tokens into text (stop strings, usage) and hands the deltas to each request's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.backends.transformers import LoadedModel, TransformersEngine, load_model
from easllm.engine.backends.transformers_detokenizer import HFDetokenizer
from easllm.engine.base import EngineError, EngineOverloaded
from easllm.engine.stop import StopMatcher
from easllm.engine.stream import Item, Stream, put_all
from easllm.engine.types import (
    EngineHealth,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenDelta,
    Usage,
)
from easllm.errors import InvalidRequest, NotReady

log = logging.getLogger(__name__)

PAGE_SIZE = 256  # KV cache tokens per block


def batchable(s: SamplingParams) -> bool:
    """Whether the manager can honour these settings per request (else: the sequential engine)."""
    return s.repetition_penalty == 1.0 and (s.greedy or s.seed is None)


def refuse_unsupported(s: SamplingParams) -> None:
    """What neither path of this engine can do: an error, never a silently different answer."""
    for param, asked in (
        ("grammar", s.grammar is not None),
        ("logprobs", s.logprobs is not None),
        ("presence_penalty", s.presence_penalty != 0.0),
        ("frequency_penalty", s.frequency_penalty != 0.0),
    ):
        if asked:
            raise InvalidRequest(f"{param} is not supported by the transformers engine", param)


@dataclass
class _Answer:
    """One request in the manager, as its client sees it (used by the reader thread only)."""

    req: GenerationRequest
    stream: Stream
    detokenizer: HFDetokenizer
    stops: StopMatcher = field(init=False)
    max_new_tokens: int = 0  # what the manager was asked for: the request's, capped by the context
    seen: int = 0  # generated tokens already read from the manager's outputs
    count: int = 0  # generated tokens, end-of-sequence not counted

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.req.sampling.stop)

    def read(self, tokens: list[int], eos: set[int]) -> tuple[str, list[int], bool]:
        """New text and token ids from the tokens so far; True when it hit a stop string or EOS."""
        new, self.seen = tokens[self.seen :], len(tokens)
        ids: list[int] = []
        text = ""
        for token in new:
            if token in eos:
                return text, ids, True
            ids.append(token)
            self.count += 1
            text += self.stops.push(self.detokenizer.push(token))
            if self.stops.stopped:
                return text, ids, True
        return text, ids, False

    def finish(self, reason: FinishReason, text: str = "", ids: list[int] | None = None) -> TokenDelta:
        if reason is not FinishReason.ABORT:  # an incomplete last character is dropped, as before
            text += self.stops.flush()
        usage = Usage(len(self.req.prompt_token_ids), self.count)
        return TokenDelta(self.req.request_id, text, ids or [], reason, usage)


class TransformersBatchingEngine:
    name = "transformers"

    def __init__(self, model_dir: Path, config: EngineConfig, display_name: str) -> None:
        self.model_dir = model_dir
        self.config = config
        self.display_name = display_name
        self.sequential: TransformersEngine | None = None  # for what the manager cannot do
        self._loaded: LoadedModel | None = None
        self._manager: Any = None
        self._eos: set[int] = set()
        self._answers: dict[str, _Answer] = {}  # requests in the manager, by id
        self._aborted = 0  # counted for health()
        self._finished = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closing = False

    # -- the Engine interface --
    @property
    def model_info(self) -> ModelInfo:
        if self._loaded is None:
            raise NotReady("the model is still loading")
        return self._loaded.info

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if self._loaded is None:
            raise NotReady("the model is still loading")
        return list(self._loaded.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    async def start(self) -> None:
        self._closing = False  # an app may run its lifespan again (tests do): the engine starts afresh
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(load_model, self.model_dir, self.config, self.display_name)
        self._eos = self._loaded.eos_ids()
        self.sequential = TransformersEngine(self.model_dir, self.config, self.display_name, self._loaded)
        await self.sequential.start()
        self._manager = await asyncio.to_thread(self._start_manager, self._loaded)
        self._reader = threading.Thread(target=self._read_outputs, name="transformers-outputs", daemon=True)
        self._reader.start()

    async def close(self) -> None:
        self._closing = True
        if self._manager is not None:
            await asyncio.to_thread(self._manager.stop, block=True, timeout=30, hard_stop=True)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
            self._reader = None
        self._manager = None
        with self._lock:
            answers, self._answers = self._answers, {}
        put_all([(a.stream, NotReady("the server is shutting down")) for a in answers.values()])
        if self.sequential is not None:
            await self.sequential.close()

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._manager is None or self.sequential is None or self._closing:
            raise NotReady("the model is still loading")
        refuse_unsupported(req.sampling)
        if not batchable(req.sampling):
            async for delta in self.sequential.generate(req):
                yield delta
            return
        answer = self._admit(req)
        async with contextlib.aclosing(answer.stream.deltas(lambda: self.abort(req.request_id))) as deltas:
            async for delta in deltas:
                yield delta

    async def abort(self, request_id: str) -> None:
        with self._lock:
            answer = self._answers.pop(request_id, None)
        if answer is None:
            if self.sequential is not None:
                await self.sequential.abort(request_id)
            return
        self._manager.cancel_request(request_id)  # the manager frees its KV blocks at its next step
        self._aborted += 1
        log.info("request %s aborted after %d tokens", request_id, answer.count)
        answer.stream.put(answer.finish(FinishReason.ABORT))

    def health(self) -> EngineHealth:
        manager = self._manager
        with self._lock:
            outstanding = len(self._answers)
        running = min(outstanding, len(_scheduler_requests(manager, "active_requests")))
        details: dict[str, object] = {
            "continuous_batching": "transformers",
            "max_batch": self.config.max_batch,
            "manager_running": len(_scheduler_requests(manager, "active_requests")),
            "manager_waiting": len(_scheduler_requests(manager, "waiting_requests")),
        }
        seq = self.sequential.health() if self.sequential is not None else None
        if seq is not None:
            details.update(sequential_running=seq.running, sequential_waiting=seq.waiting)
        return EngineHealth(
            ready=manager is not None and manager.is_running() and not self._closing,
            engine=self.name,
            model=self.display_name,
            running=running + (seq.running if seq else 0),
            waiting=outstanding - running + (seq.waiting if seq else 0),
            aborted_total=self._aborted + (seq.aborted_total if seq else 0),
            finished_total=self._finished + (seq.finished_total if seq else 0),
            details=details,
        )

    # -- the manager --
    def _start_manager(self, loaded: LoadedModel) -> Any:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        # Sampling on, and each warper present so that every request can set its own value:
        # the values here are placeholders, every request passes its own three.
        generation = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=1,
            top_p=0.5,
            eos_token_id=sorted(self._eos) or None,
            pad_token_id=loaded.pad_id,
        )
        context = loaded.info.context_length
        kv_tokens = max(self.config.kv_size or context * min(4, self.config.max_batch), context)
        cb = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=math.ceil(kv_tokens / PAGE_SIZE) + 1,
            max_batch_tokens=self.config.max_batch_tokens,
            max_requests_per_batch=self.config.max_batch,
            per_request_processors=True,
        )
        manager = loaded.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=cb
        )
        with torch.inference_mode():  # the manager's thread runs in the starting thread's mode
            manager.start()
        return manager

    def _admit(self, req: GenerationRequest) -> _Answer:
        assert self._loaded is not None
        prompt = req.prompt_token_ids
        context = self._loaded.info.context_length
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(prompt) >= context:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; the context holds {context} with the answer", "prompt"
            )
        s = req.sampling
        answer = _Answer(req, Stream(), HFDetokenizer(self._loaded.tokenizer))
        answer.max_new_tokens = min(s.max_new_tokens, context - len(prompt))
        with self._lock:
            if len(self._answers) >= self.config.max_batch + self.config.max_queue:
                raise EngineOverloaded("the engine queue is full")
            if req.request_id in self._answers:
                raise InvalidRequest(f"request id {req.request_id} is already running", "request_id")
            self._answers[req.request_id] = answer
        vocab = len(self._loaded.tokenizer)
        added = self._manager.add_request(
            prompt,
            request_id=req.request_id,
            max_new_tokens=answer.max_new_tokens,
            streaming=True,
            temperature=1.0 if s.greedy else float(s.temperature),
            top_k=1 if s.greedy else int(s.top_k or vocab),
            top_p=1.0 if s.greedy else float(s.top_p),
        )
        if added is None:  # the manager's loop has stopped (it failed: see the log)
            with self._lock:
                self._answers.pop(req.request_id, None)
            raise EngineError("the continuous batching loop is not running")
        return answer

    # -- the reader thread --
    def _read_outputs(self) -> None:
        manager = self._manager
        while not self._closing:
            output = manager.get_result(timeout=0.1)
            if output is None:
                if not manager.is_running() and not self._closing:
                    self._fail_all(EngineError("the continuous batching loop stopped"))
                    self._closing_wait()
                continue
            outputs = [output]
            while (more := manager.get_result(timeout=0)) is not None:
                outputs.append(more)
            put_all([item for o in outputs if (item := self._item(o)) is not None])

    def _item(self, output: Any) -> tuple[Stream, Item] | None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        with self._lock:
            answer = self._answers.get(output.request_id)
        if answer is None:
            return None  # aborted: its client is gone
        if output.status == RequestStatus.FAILED:
            self._forget(answer)
            return answer.stream, EngineError(f"generation failed: {output.error}")
        text, ids, ended = answer.read(output.generated_tokens, self._eos)
        if not ended and not output.is_finished():
            return (answer.stream, TokenDelta(answer.req.request_id, text, ids)) if ids else None
        if not output.is_finished():
            self._manager.cancel_request(output.request_id)  # a stop string: the manager still runs it
        self._forget(answer)
        self._finished += 1
        length = not ended and answer.count >= answer.max_new_tokens
        return answer.stream, answer.finish(FinishReason.LENGTH if length else FinishReason.STOP, text, ids)

    def _forget(self, answer: _Answer) -> None:
        with self._lock:
            self._answers.pop(answer.req.request_id, None)

    def _fail_all(self, error: EngineError) -> None:
        log.error("%s", error)
        with self._lock:
            answers, self._answers = self._answers, {}
        put_all([(a.stream, error) for a in answers.values()])

    def _closing_wait(self) -> None:
        threading.Event().wait(0.1)  # the loop is gone: poll slowly until close()


def _scheduler_requests(manager: Any, name: str) -> dict[str, Any]:
    """The manager scheduler's own table of running or waiting requests, for health only."""
    processor = getattr(manager, "batch_processor", None)
    return getattr(getattr(processor, "scheduler", None), name, None) or {}
