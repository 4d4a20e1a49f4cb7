"""Render a conversation with the model's own chat template and fit it into the context.

GGUF and tokenizer_config.json templates are untrusted input, so they run in Jinja2's
immutable sandbox, as transformers' `apply_chat_template` does, with bounded time, output and
allocations (`chat/sandbox.py`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from easllm.chat.sandbox import BoundedSandbox, render_bounded
from easllm.engine.types import ModelInfo
from easllm.errors import InvalidRequest

Message = dict[str, Any]  # role and content; tool messages and calls add their own keys
MAX_CHARS_PER_TOKEN = 64  # no tokenizer packs more; longer texts cannot fit and are not tokenized
Tokenize = Callable[[str, bool], list[int]]  # Engine.tokenize(text, add_special)


@dataclass(frozen=True)
class Conversation:
    prompt: str
    system_prompt: str = ""
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BuiltPrompt:
    token_ids: list[int]
    max_new_tokens: int  # what the context leaves, capped at the request's value
    rounds_used: int  # how many history rounds survived max_round and the context


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """Hugging Face's `tojson` (keys in order, no HTML escapes), which templates were written for."""
    indent = None if indent is None else max(0, min(int(indent), 16))
    seps = tuple(separators) if separators is not None else None
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=seps, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the model's chat template does not compile: {exc}") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        try:
            return render_bounded(
                self._template.generate(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                    tools=list(tools) if tools else None,
                )
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", "messages") from exc


def conversation_messages(conv: Conversation, rounds: Sequence[tuple[str, str]]) -> list[Message]:
    messages: list[Message] = []
    if conv.system_prompt:
        messages.append({"role": "system", "content": conv.system_prompt})
    for user, assistant in rounds:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": conv.prompt})
    return messages


class PromptBuilder:
    """Turns conversations and message lists into prompt token ids that fit the context."""

    def __init__(self, info: ModelInfo, tokenize: Tokenize, no_template: bool = False) -> None:
        self.context_length = info.context_length
        self._tokenize = tokenize
        self.template = (
            ChatTemplate(info.chat_template, info.bos_token, info.eos_token) if info.chat_template else None
        )
        self.no_template_default = no_template or self.template is None

    def encode_raw(self, text: str, param: str = "prompt") -> list[int]:
        self._check_length(text, param)
        return self._tokenize(text, True)

    def encode_messages(
        self,
        messages: Sequence[Message],
        param: str = "messages",
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        if self.template is None:
            raise InvalidRequest("this model has no chat template: use a completion", "messages")
        text = self.template.render(messages, tools=tools)
        self._check_length(text, param)
        starts_with_bos = bool(self.template.bos_token) and text.startswith(self.template.bos_token)
        return self._tokenize(text, not starts_with_bos)

    def build(
        self,
        conv: Conversation,
        *,
        max_round: int,
        max_new_tokens: int,
        no_template: bool | None = None,
    ) -> BuiltPrompt:
        raw = self.no_template_default if no_template is None else (no_template or self.template is None)
        if raw:
            return self.fit(self.encode_raw(conv.prompt), max_new_tokens)
        rounds = list(conv.history[-max_round:]) if max_round > 0 else []
        while True:
            ids = self.encode_messages(conversation_messages(conv, rounds), "prompt")
            if not rounds or len(ids) + max_new_tokens <= self.context_length:
                return self.fit(ids, max_new_tokens, "prompt", len(rounds))
            rounds.pop(0)  # the oldest round goes first

    def _check_length(self, text: str, param: str) -> None:
        if len(text) > MAX_CHARS_PER_TOKEN * self.context_length:
            raise InvalidRequest(
                f"the prompt is {len(text)} characters; the model's context is {self.context_length} tokens",
                param,
            )

    def fit(self, ids: list[int], max_new_tokens: int, param: str = "prompt", rounds: int = 0) -> BuiltPrompt:
        """The one fitting: `max_new_tokens` capped at what the context leaves after the prompt;
        a prompt that leaves no room is a 400 naming `param`."""
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens; the model's context is {self.context_length}",
                param,
            )
        return BuiltPrompt(ids, min(max_new_tokens, room), rounds)
