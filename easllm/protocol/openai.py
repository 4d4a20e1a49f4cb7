"""The OpenAI API requests (chat completions, completions, embeddings) -> native types.

Field names live here and in `openai_replies.py` only; the routes get `SamplingParams`, chat
messages and prompt strings. Fields OpenAI defines that change nothing here (`user`, `store`,
`metadata`, ...) and unknown fields are accepted and logged; fields that would change the answer
and are not supported (`logit_bias`, `suffix`, penalties or logprobs or grammars on an engine
without them) are refused with 400 naming the field. Tool calling's fields: `openai_tools.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from easllm.chat.template import Message
from easllm.config import SamplingDefaults
from easllm.engine.types import ModelInfo, SamplingParams
from easllm.errors import InvalidRequest
from easllm.protocol.json_grammar import json_object_grammar, json_schema_grammar
from easllm.protocol.openai_tools import (
    MAX_TOOLS,
    AssistantToolCall,
    FunctionCallField,
    FunctionCallPart,
    FunctionDef,
    ToolChoiceField,
    ToolDef,
    check_tool_messages,
    tool_request,
)
from easllm.protocol.validation import (
    Seed,
    StopStrings,
    UnknownFieldLog,
    derived_seed,
    load_json,
    validate,
)
from easllm.tools.types import ToolRequest

log = logging.getLogger(__name__)
log_unknown = UnknownFieldLog(log)

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n on /v1/completions
MAX_EMBEDDING_INPUTS = 2048
MAX_TOP_LOGPROBS = 20

# OpenAI fields that do not change the answer of a single-model service: accepted, not logged.
NO_EFFECT = frozenset(
    {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key"}
)


def parse_json_object(body: bytes) -> dict[str, Any]:
    data = load_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", "body")
    return data


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Any:
        log_unknown(cls.__name__, sorted(set(data) - set(cls.model_fields) - NO_EFFECT))
        return validate(cls, data)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Generation(_Request):
    """Fields shared by chat completions and completions."""

    model: StrictStr | None = None  # one model per service: any name is accepted
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM): 0 or -1 means no top-k
    repetition_penalty: float = Field(1.0, gt=0)  # extension (vLLM)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: Seed = None
    stop: StopStrings = []
    n: int = Field(1, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check(self) -> None:
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")

    def _sampling(
        self,
        defaults: SamplingDefaults,
        info: ModelInfo,
        max_tokens: int | None,
        logprobs: int | None,
        grammar: str | None = None,
    ) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) and "penalties" not in info.features:
                raise InvalidRequest(f"{name} is not supported by the {info.engine} engine", name)
        top_k = self.top_k if self.top_k is not None else (defaults.top_k or 0)
        return SamplingParams(
            max_new_tokens=min(max_tokens or defaults.max_new_tokens, defaults.max_new_tokens),
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_k=max(top_k, 0),
            top_p=self.top_p if self.top_p is not None else (defaults.top_p or 1.0),
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
            grammar=grammar,
            logprobs=logprobs,
        )


def require_feature(info: ModelInfo, feature: str, param: str) -> None:
    if feature not in info.features:
        raise InvalidRequest(f"{param} needs {feature} support, which the {info.engine} engine lacks", param)


def choice_samplings(sampling: SamplingParams, n: int) -> list[SamplingParams]:
    """One sampling setting per choice; a fixed seed gives each choice its own derived seed."""
    if sampling.seed is None:
        return [sampling] * n
    return [replace(sampling, seed=derived_seed(sampling.seed, i)) for i in range(n)]


# -- chat completions --


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | None = None  # a list of text parts is joined in the validator
    tool_calls: list[AssistantToolCall] | None = None  # assistant: the calls it made
    tool_call_id: StrictStr | None = None  # tool: the call this message answers
    name: StrictStr | None = None  # function (legacy): the function that answered
    function_call: FunctionCallPart | None = None  # assistant (legacy): its one call

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported (got type {kind!r})")
            texts.append(part["text"])
        return "".join(texts)

    def as_message(self) -> Message:
        role = "system" if self.role == "developer" else self.role
        message: Message = {"role": role, "content": self.content or ""}
        calls = [c.as_template_call() for c in self.tool_calls or ()]
        if self.function_call is not None:
            calls.append(
                {"id": "call_legacy", "type": "function", "function": self.function_call.as_template_call()}
            )
        if calls:
            message["tool_calls"] = calls
        if role == "function":
            message["role"] = "tool"
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: StrictStr = "response"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceField = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[FunctionDef] | None = Field(None, max_length=MAX_TOOLS)  # legacy tools
    function_call: FunctionCallField = None  # legacy tool_choice
    langchain: bool = False  # extension: answer from the service's knowledge base
    knowledge_base: bool = False  # the same, under the name `extra_body` users reach for

    @property
    def use_knowledge(self) -> bool:
        return self.langchain or self.knowledge_base

    def messages_native(self) -> list[Message]:
        return [m.as_message() for m in self.messages]

    def sampling(self, defaults: SamplingDefaults, info: ModelInfo) -> SamplingParams:
        self._check()
        check_tool_messages(self.messages)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", "top_logprobs")
        logprobs = None
        if self.logprobs:
            require_feature(info, "logprobs", "logprobs")
            logprobs = self.top_logprobs or 0
        return self._sampling(
            defaults, info, self.max_completion_tokens or self.max_tokens, logprobs, self._grammar(info)
        )

    def tool_request(self) -> ToolRequest | None:
        """The tools offered and how they must be used; None when none are."""
        return tool_request(
            self.tools, self.functions, self.tool_choice, self.function_call, self.parallel_tool_calls
        )

    @property
    def legacy_functions(self) -> bool:
        return self.tools is None and self.functions is not None

    def _grammar(self, info: ModelInfo) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        require_feature(info, "grammar", "response_format")
        if fmt.type == "json_object":
            return json_object_grammar()
        if fmt.json_schema is None:
            raise InvalidRequest(
                "response_format.json_schema is required for type json_schema", "response_format"
            )
        return json_schema_grammar(fmt.json_schema.json_schema)


# -- completions --


class CompletionRequest(_Generation):
    prompt: list[StrictStr] = Field(min_length=1, max_length=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: StrictStr | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and _holds_token_ids(value):
            raise ValueError("token-id prompts are not supported: send text")
        return value

    def sampling(self, defaults: SamplingDefaults, info: ModelInfo) -> SamplingParams:
        self._check()
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequest("best_of other than n is not supported", "best_of")
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise InvalidRequest(f"prompts x n must be at most {MAX_CHOICES}", "n")
        if self.logprobs is not None:
            require_feature(info, "logprobs", "logprobs")
            if self.echo:
                raise InvalidRequest("echo with logprobs (prompt log-probabilities) is not supported", "echo")
        return self._sampling(defaults, info, self.max_tokens, self.logprobs)


def _holds_token_ids(items: Iterable[Any]) -> bool:
    return any(isinstance(x, int) or (isinstance(x, list) and x and isinstance(x[0], int)) for x in items)


# -- embeddings --


class EmbeddingRequest(_Request):
    input: list[StrictStr] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    model: StrictStr | None = None  # one embedder per service: any name is accepted
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    input_type: Literal["passage", "query"] = "passage"  # extension: e5's two prefixes

    @field_validator("input", mode="before")
    @classmethod
    def _input_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and _holds_token_ids(value):
            raise ValueError("token-id inputs are not supported: send text")
        return value

    @field_validator("input")
    @classmethod
    def _no_empty_input(cls, value: list[str]) -> list[str]:
        if any(not s.strip() for s in value):
            raise ValueError("inputs must not be empty strings")
        return value

    def check_dimensions(self, dim: int) -> None:
        if self.dimensions is not None and self.dimensions != dim:
            raise InvalidRequest(f"this embedder gives {dim} dimensions only", "dimensions")
