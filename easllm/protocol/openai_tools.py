"""The OpenAI tool-calling fields: `tools`, `tool_choice`, legacy `functions`, and their replies.

Requests become a native `ToolRequest` (easllm/tools/types.py); calls come back as `tool_calls`
(or `function_call` when the request used the legacy `functions`), streamed as OpenAI streams
them: per call one chunk with `index`, `id`, `type` and the name, then the arguments in pieces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from easllm.errors import InvalidRequest
from easllm.tools.types import ChoiceMode, Tool, ToolCall, ToolChoice, ToolRequest
from easllm.tools.validate import check_parameters

MAX_TOOLS = 128  # OpenAI's own limit
MAX_DESCRIPTION = 4096  # characters of one tool's description
ARGUMENT_PIECE = 16  # characters of arguments per stream chunk
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr = Field(pattern=NAME_PATTERN)
    description: StrictStr = Field("", max_length=MAX_DESCRIPTION)
    parameters: Any = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


class FunctionCallPart(BaseModel):
    """A call in an earlier assistant message: the arguments are JSON text."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    arguments: StrictStr = "{}"

    def as_template_call(self) -> dict[str, Any]:
        # Chat templates (Hugging Face's convention) take the arguments as an object.
        try:
            arguments: Any = json.loads(self.arguments)
        except json.JSONDecodeError:
            arguments = self.arguments
        return {"name": self.name, "arguments": arguments}


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallPart

    def as_template_call(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": self.function.as_template_call()}


ToolChoiceField = Literal["none", "auto", "required"] | NamedToolChoice | None
FunctionCallField = Literal["none", "auto"] | FunctionName | None


def tool_request(
    tools: Sequence[ToolDef] | None,
    functions: Sequence[FunctionDef] | None,
    tool_choice: ToolChoiceField,
    function_call: FunctionCallField,
    parallel: bool | None,
) -> ToolRequest | None:
    """The request's tools and how they must be used; None when it offers none."""
    if tools and functions:
        raise InvalidRequest("send tools or the legacy functions, not both", "functions")
    legacy = tools is None and functions is not None
    defs = [t.function for t in tools or ()] if not legacy else list(functions or ())
    param = "functions" if legacy else "tools"
    choice_param = "function_call" if legacy else "tool_choice"
    choice_value: Any = function_call if legacy else tool_choice
    if len(defs) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools may be given", param)
    if not defs:
        if choice_value not in (None, "none"):
            raise InvalidRequest(f"{choice_param} is only allowed when {param} are given", choice_param)
        return None
    seen: set[str] = set()
    native = []
    for i, d in enumerate(defs):
        if d.name in seen:
            raise InvalidRequest(f"{param}[{i}]: the name {d.name!r} is given twice", param)
        seen.add(d.name)
        schema = check_parameters({} if d.parameters is None else d.parameters, f"{param}[{i}]", param)
        native.append(Tool(d.name, d.description, schema))
    choice = _choice(choice_value, seen, choice_param)
    single = legacy or parallel is False or choice.mode is ChoiceMode.NAMED
    return ToolRequest(tuple(native), choice, parallel=not single)


def _choice(value: Any, names: set[str], param: str) -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice(ChoiceMode.AUTO)
    if isinstance(value, str):
        return ToolChoice(ChoiceMode(value))
    name = value.function.name if isinstance(value, NamedToolChoice) else value.name
    if name not in names:
        raise InvalidRequest(f"{param} names {name!r}, which is not among the tools given", param)
    return ToolChoice(ChoiceMode.NAMED, name)


def check_tool_messages(messages: Sequence[Any]) -> None:
    """Every tool message answers a call made by an earlier assistant message."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.tool_calls:
            called.update(c.id for c in m.tool_calls)
        elif m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id", "messages")
            if m.tool_call_id not in called:
                raise InvalidRequest(
                    f"messages[{i}]: tool_call_id {m.tool_call_id!r} answers no earlier tool call", "messages"
                )


# -- replies --


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def message_tool_fields(calls: Sequence[ToolCall], legacy: bool) -> dict[str, Any]:
    """What a reply's `message` holds besides its text: the calls, in the request's dialect."""
    if not calls:
        return {}
    if legacy:
        return {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}
    return {"tool_calls": [_call_dict(c) for c in calls]}


def tool_call_deltas(calls: Sequence[ToolCall], legacy: bool) -> list[dict[str, Any]]:
    """The stream `delta`s of the calls: the head of each, then its arguments in pieces."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls[:1] if legacy else calls):
        pieces = [
            call.arguments[i : i + ARGUMENT_PIECE] for i in range(0, len(call.arguments), ARGUMENT_PIECE)
        ]
        if legacy:
            deltas.append({"function_call": {"name": call.name, "arguments": ""}})
            deltas += [{"function_call": {"arguments": p}} for p in pieces]
            continue
        head = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        deltas.append({"tool_calls": [head]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in pieces]
    return deltas
