"""The OpenAI API replies: completions, chat completions, their stream chunks, models, embeddings."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from easllm.engine.types import FinishReason, ModelInfo, TokenLogprob, Usage
from easllm.protocol.openai_tools import message_tool_fields
from easllm.tools.types import ToolCall


@dataclass
class ChoiceOutput:
    """One choice as it accumulates from the engine's deltas."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache gave this choice
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Envelope:
    """The fields every reply and chunk of one request shares."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, object_name: str, model: str) -> Envelope:
        return cls(f"{prefix}-{uuid.uuid4().hex}", object_name, model)

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        out["choices"] = choices
        out.update(extra)
        return out


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},  # OpenAI's own field
    }


def request_usage(prompt_tokens: int, choices: list[Usage]) -> Usage:
    """One request's usage over its choices: each choice's answer counts; the prompt, once, and
    cached as far as every choice found it cached."""
    cached = min((u.cached_tokens for u in choices), default=0)
    return Usage(prompt_tokens, sum(u.completion_tokens for u in choices), cached)


def finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def model_card(info: ModelInfo, created: int) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "model",
        "created": created,
        "owned_by": "easllm",
        "context_length": info.context_length,  # ours: vLLM calls it max_model_len
        "max_model_len": info.context_length,
        "engine": info.engine,
        "features": sorted(info.features),
        "chat": info.chat_template is not None,
    }


# -- chat completions --


def chat_logprobs(entries: list[TokenLogprob], top_n: int) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for e in entries:
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


def chat_message(c: ChoiceOutput) -> dict[str, Any]:
    legacy = c.finish_reason is FinishReason.FUNCTION_CALL
    content = c.text or None if c.tool_calls else c.text
    return {
        "role": "assistant",
        "content": content,
        "refusal": None,
        **message_tool_fields(c.tool_calls, legacy),
    }


def chat_completion(
    env: Envelope, choices: list[ChoiceOutput], usage: Usage, top_logprobs: int | None, **extra: Any
) -> dict[str, Any]:
    """`top_logprobs`: None when logprobs were not asked for."""
    return env.body(
        [
            {
                "index": c.index,
                "message": chat_message(c),
                "logprobs": None if top_logprobs is None else chat_logprobs(c.logprobs, top_logprobs),
                "finish_reason": finish(c.finish_reason),
            }
            for c in choices
        ],
        usage=usage_dict(usage),
        system_fingerprint=None,
        **extra,
    )


def chat_chunk(
    env: Envelope,
    index: int,
    delta: dict[str, Any],
    finish_reason: FinishReason | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish(finish_reason)}
    if include_usage:
        extra["usage"] = None  # every chunk but the last has usage null, as OpenAI sends it
    return env.body([choice], system_fingerprint=None, **extra)


def usage_chunk(env: Envelope, usage: Usage) -> dict[str, Any]:
    """The last chunk with `stream_options.include_usage`: no choices, the request's usage."""
    return env.body([], usage=usage_dict(usage), system_fingerprint=None)


# -- completions --


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def completion(
    env: Envelope, choices: list[ChoiceOutput], usage: Usage, logprobs: bool, offsets: list[int]
) -> dict[str, Any]:
    """`offsets[i]`: where choice i's generated text starts in its `text` (the prompt's length with echo)."""
    return env.body(
        [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(c.logprobs, offsets[i]) if logprobs else None,
                "finish_reason": finish(c.finish_reason),
            }
            for i, c in enumerate(choices)
        ],
        usage=usage_dict(usage),
    )


def completion_chunk(
    env: Envelope,
    index: int,
    text: str,
    finish_reason: FinishReason | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish(finish_reason)}
    return env.body([choice], **({"usage": None} if include_usage else {}))


# -- embeddings --


def embedding_list(
    vectors: np.ndarray, model: str, encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    rows = np.asarray(vectors, dtype="<f4")
    data = []
    for i, row in enumerate(rows):
        value: Any = base64.b64encode(row.tobytes()).decode() if encoding_format == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
