"""The EAS HTTP protocol (SPEC section 2): request parsing and reply/stream chunk shapes."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
)

from easllm.chat.template import Conversation
from easllm.config import SamplingDefaults
from easllm.engine.types import FinishReason, SamplingParams, Usage
from easllm.errors import InvalidRequest
from easllm.protocol.validation import Seed, StopStrings, UnknownFieldLog, check_json_size, validate

log = logging.getLogger(__name__)
log_unknown = UnknownFieldLog(log)

MAX_HISTORY_ROUNDS = 1000  # only the last --max-round reach the prompt; all are echoed in every reply
MAX_HISTORY_CHARS = 256 * 1024  # all rounds together: a stream repeats them in every chunk

Round = tuple[StrictStr, StrictStr]


class EasRequest(BaseModel):
    """One structured request. Sampling fields left as None take the server's defaults."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: StrictStr = Field("", validation_alias=AliasChoices("prompt", "input_ids"))
    system_prompt: StrictStr = ""
    history: list[Round] = Field([], max_length=MAX_HISTORY_ROUNDS)
    max_new_tokens: int | None = Field(None, ge=1)
    use_stream_chat: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    do_sample: bool = True
    use_cache: bool = True
    stop: StopStrings = Field([], validation_alias=AliasChoices("stop", "stop_sequences"))
    repetition_penalty: float = Field(1.0, gt=0)
    seed: Seed = None
    langchain: bool = False
    no_template: bool | None = None
    stream_format: Literal["cumulative", "delta"] = "cumulative"

    def conversation(self) -> Conversation:
        return Conversation(self.prompt, self.system_prompt, tuple(self.history))

    def sampling(self, defaults: SamplingDefaults) -> SamplingParams:
        """Native sampling parameters; fields the request left out take the server's defaults."""
        temperature = defaults.temperature if self.temperature is None else self.temperature
        return SamplingParams(
            max_new_tokens=min(self.max_new_tokens or defaults.max_new_tokens, defaults.max_new_tokens),
            temperature=temperature if self.do_sample else 0.0,
            top_k=self.top_k if self.top_k is not None else (defaults.top_k or 0),
            top_p=self.top_p if self.top_p is not None else (defaults.top_p or 1.0),
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
        )

    @field_validator("history", mode="before")
    @classmethod
    def _drop_empty_rounds(cls, value: Any) -> Any:
        # The published sample's default is [()]: an empty round means "no history".
        if value is None:
            return []
        if isinstance(value, list):
            if len(value) > MAX_HISTORY_ROUNDS:  # before validating each of them
                raise ValueError(f"at most {MAX_HISTORY_ROUNDS} rounds (got {len(value)})")
            return [item for item in value if not (isinstance(item, list | tuple) and not item)]
        return value

    @field_validator("history")
    @classmethod
    def _bounded_history(cls, value: list[Round]) -> list[Round]:
        if sum(len(q) + len(a) for q, a in value) > MAX_HISTORY_CHARS:
            raise ValueError(f"the rounds hold more than {MAX_HISTORY_CHARS} characters in all")
        return value


def parse_eas_body(body: bytes, content_type: str | None) -> EasRequest | str:
    """A JSON object is a structured request; any other body is the prompt itself."""
    is_json = (content_type or "").split(";")[0].strip().lower() == "application/json"
    if not body.strip():
        raise InvalidRequest("the request body is empty: send a prompt or a JSON object", "prompt")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("the request body is not valid UTF-8", "body") from exc
    try:
        check_json_size(body)
    except InvalidRequest:
        if is_json:
            raise
        return text  # not a request object anyone could send: the prompt itself
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if is_json:
            raise InvalidRequest(f"invalid JSON: {exc.msg} at position {exc.pos}", "body") from exc
        return text
    except RecursionError as exc:
        if is_json:
            raise InvalidRequest("the JSON body is nested too deeply", "body") from exc
        return text
    if not isinstance(data, dict):
        if is_json:
            raise InvalidRequest("the JSON body must be an object", "body")
        return text
    return eas_request_from_dict(data)


def eas_request_from_dict(data: dict[str, Any]) -> EasRequest:
    cleaned = {str(key).strip(): value for key, value in data.items()}
    known = set(EasRequest.model_fields) | {"input_ids", "stop_sequences"}
    unknown = sorted(set(cleaned) - known)
    log_unknown("EAS request", unknown)
    req: EasRequest = validate(EasRequest, cleaned)
    return req


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,  # prompt tokens whose KV came from the prefix cache
    }


def reply(
    response: str,
    history: list[tuple[str, str]],
    usage: Usage | None = None,
    finish_reason: FinishReason | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A full reply, or a stream chunk when usage and finish_reason are None."""
    out: dict[str, Any] = {"response": response, "history": [list(r) for r in history]}
    if usage is not None:
        out["usage"] = usage_dict(usage)
    if finish_reason is not None:
        out["finish_reason"] = finish_reason.value
    if sources is not None:
        out["sources"] = sources
    return out


class RoundReplies:
    """The replies of one round as JSON text, the same as `json.dumps(reply(...))`: the earlier
    rounds are serialised once, not again for every chunk of a stream."""

    def __init__(self, history: list[tuple[str, str]], prompt: str) -> None:
        earlier = _dumps([list(r) for r in history])
        self._head = earlier[:-1] + (", " if history else "") + "[" + _dumps(prompt) + ", "

    def dumps(
        self,
        response: str,
        answer_so_far: str,
        usage: Usage | None = None,
        finish_reason: FinishReason | None = None,
        sources: list[dict[str, Any]] | None = None,
    ) -> str:
        tail = reply(response, [], usage, finish_reason, sources)
        del tail["response"], tail["history"]
        rest = (", " + _dumps(tail)[1:-1]) if tail else ""
        history = self._head + _dumps(answer_so_far) + "]]"
        return '{"response": ' + _dumps(response) + ', "history": ' + history + rest + "}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
