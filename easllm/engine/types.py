"""Plain data passed between the protocol layer and the engines (no JSON, no HTTP)."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens or the context was reached
    ABORT = "abort"  # the client went away or the request was cancelled
    TOOL_CALLS = "tool_calls"  # the answer is tool calls (set by easllm/tools, never by an engine)
    FUNCTION_CALL = "function_call"  # the same, for requests with the legacy `functions`


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 2048
    temperature: float = 0.95
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF text, for grammar-constrained decoding
    # With triggers the grammar is lazy: it applies from the first trigger text on (which its
    # root must start with); until then the output is free. Engines with `grammar_triggers`.
    grammar_triggers: tuple[str, ...] = ()
    logprobs: int | None = None  # top-N log-probabilities per generated token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the top-N alternatives at that step."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class TokenDelta:
    """New text since the previous delta; the last delta of a request has `finish_reason`."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked for


@dataclass(frozen=True)
class ModelInfo:
    name: str
    engine: str
    context_length: int
    chat_template: str | None  # Jinja2 text; None for base models
    bos_token: str = ""
    eos_token: str = ""
    features: frozenset[str] = frozenset()  # of FEATURES: what this engine can do beyond sampling


FEATURES = frozenset({"logprobs", "grammar", "penalties"})
GRAMMAR_TRIGGERS = "grammar_triggers"  # lazy grammars (SamplingParams.grammar_triggers): llama.cpp


@dataclass
class EngineHealth:
    ready: bool
    engine: str
    model: str
    running: int = 0
    waiting: int = 0
    aborted_total: int = 0
    finished_total: int = 0
    details: dict[str, object] = field(default_factory=dict)
