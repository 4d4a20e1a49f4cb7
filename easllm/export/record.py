"""One answered round as it is exported: the JSON Lines record format lives here and only here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from easllm.chat.template import Conversation
from easllm.engine.types import SamplingParams, Usage


def utc_iso(seconds: float) -> str:
    """2025-01-31T12:00:00.123Z"""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class RoundRecord:
    """What a round was asked, what was answered, how, and how long it took."""

    time: float  # when the answer finished (epoch seconds); it started `latency` seconds earlier
    service: str
    api: str  # eas | websocket | openai.chat | openai.completions | webui
    model: str
    request_id: str | None  # the X-Request-Id of the HTTP request or WebSocket connection
    session: str | None  # the WebSocket connection or WebUI session; None for one-shot HTTP
    client: str | None  # the client's address
    conversation: Conversation
    response: str
    sampling: SamplingParams
    usage: Usage
    latency: float  # seconds from the request's arrival to the last token
    time_to_first_token: float | None
    finish_reason: str  # stop | length | abort | error
    sources: Sequence[Mapping[str, Any]] = field(default_factory=list)
    choice: int = 0  # the choice index of an OpenAI request with n > 1

    def to_json(self) -> dict[str, Any]:
        conv = self.conversation
        sampling = self.sampling  # not asdict(): ten times slower, and nothing here is nested
        parameters = {f.name: getattr(sampling, f.name) for f in fields(sampling)}
        parameters["stop"] = list(self.sampling.stop)
        return {
            "time": utc_iso(self.time),
            "service": self.service,
            "api": self.api,
            "model": self.model,
            "request_id": self.request_id,
            "session": self.session,
            "choice": self.choice,
            "client": self.client,
            "system_prompt": conv.system_prompt,
            "history": [list(r) for r in conv.history],
            "prompt": conv.prompt,
            "response": self.response,
            "parameters": parameters,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
                "cached_tokens": self.usage.cached_tokens,
            },
            "latency": round(self.latency, 6),
            "time_to_first_token": None
            if self.time_to_first_token is None
            else round(self.time_to_first_token, 6),
            "finish_reason": self.finish_reason,
            "sources": [dict(s) for s in self.sources],
        }

    def to_line(self) -> bytes:
        """One JSON Lines line, newline included."""
        return json.dumps(self.to_json(), ensure_ascii=False).encode() + b"\n"


def conversation_from_messages(messages: Sequence[Mapping[str, str]]) -> Conversation:
    """Chat messages as system prompt + (user, assistant) rounds + prompt, leniently: the record
    keeps what was asked even when the messages do not alternate."""
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    rest = [m for m in messages if m.get("role") != "system"]
    prompt = ""
    if rest and rest[-1].get("role") == "user":
        prompt = rest.pop()["content"]
    rounds: list[tuple[str, str]] = []
    pending: str | None = None
    for m in rest:
        if m.get("role") == "user":
            if pending is not None:
                rounds.append((pending, ""))
            pending = m["content"]
        elif m.get("role") == "assistant":
            rounds.append((pending or "", m["content"]))
            pending = None
    if pending is not None:
        rounds.append((pending, ""))
    return Conversation(prompt, system, tuple(rounds))
