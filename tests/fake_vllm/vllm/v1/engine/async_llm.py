"""Fake AsyncLLM: records calls and streams a scripted answer as cumulative RequestOutputs.

`AsyncLLM.script` is the answer as (token id, text) pieces; `hang_after` makes generate wait
after that many pieces until it is aborted or closed, as a long answer would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


class FakeTokenizer:
    chat_template = CHAT_TEMPLATE
    bos_token = "<s>"
    eos_token = "</s>"

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


@dataclass
class AsyncLLM:
    args: Any
    instances: ClassVar[list[AsyncLLM]] = []
    script: ClassVar[list[tuple[int, str]]] = [(72, "Hel"), (108, "lo"), (32, " wor"), (100, "ld")]
    hang_after: ClassVar[int | None] = None
    generate_calls: list[tuple[Any, Any, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed_streams: list[str] = field(default_factory=list)
    shut_down: bool = False
    errored: bool = False

    def __post_init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = SimpleNamespace(max_model_len=self.args.kwargs["max_model_len"])
        self.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=2))

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> AsyncLLM:
        engine = cls(engine_args)
        cls.instances.append(engine)
        return engine

    def get_tokenizer(self) -> FakeTokenizer:
        return self.tokenizer

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self.generate_calls.append((prompt, sampling_params, request_id))
        text, ids, logprobs = "", [], []
        want_logprobs = sampling_params.logprobs is not None
        try:
            for n, (token, piece) in enumerate(self.script, start=1):
                if self.hang_after is not None and n > self.hang_after:
                    while request_id not in self.aborted:
                        await asyncio.sleep(0.01)
                    yield self._output(request_id, prompt, text, ids, logprobs, "abort", want_logprobs)
                    return
                text, ids = text + piece, [*ids, token]
                logprobs.append(
                    {token: Logprob(-0.25, 1, piece), token + 1: Logprob(-2.0, 2, piece.upper() + "!")}
                )
                reason = None
                if n == len(self.script):
                    reason = "stop"
                if len(ids) >= sampling_params.max_tokens:
                    reason = "length"
                yield self._output(request_id, prompt, text, ids, logprobs, reason, want_logprobs)
                if reason:
                    return
                await asyncio.sleep(0)
        finally:
            self.closed_streams.append(request_id)

    def _output(
        self,
        request_id: str,
        prompt: Any,
        text: str,
        ids: list[int],
        logprobs: list[Any],
        reason: str | None,
        want_logprobs: bool,
    ) -> RequestOutput:
        return RequestOutput(
            request_id,
            prompt["prompt_token_ids"],
            [CompletionOutput(0, text, list(ids), list(logprobs) if want_logprobs else None, reason)],
            finished=reason is not None,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True
