"""Checks with the `jsonschema` library: tool parameters are JSON schemas, call arguments fit them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from easllm.errors import InvalidRequest
from easllm.tools.formats import RawCall
from easllm.tools.types import Tool, ToolCall

MAX_SCHEMA_DEPTH = 16  # nesting of a tool's parameters; deeper schemas are refused


def check_parameters(parameters: Any, where: str, param: str = "tools") -> dict[str, Any]:
    """A tool's `parameters` as an object schema; InvalidRequest naming `param` otherwise."""
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"{where}: parameters must be a JSON-schema object", param)
    if parameters.get("type", "object") != "object":
        raise InvalidRequest(f"{where}: parameters must describe an object (type: object)", param)
    if _depth(parameters) > MAX_SCHEMA_DEPTH:
        raise InvalidRequest(f"{where}: parameters nest deeper than {MAX_SCHEMA_DEPTH} levels", param)
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        raise InvalidRequest(
            f"{where}: parameters are not a valid JSON schema: {exc.message}", param
        ) from exc
    return {"type": "object", **parameters}


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def checked_calls(raw: Sequence[RawCall], tools: Sequence[Tool], new_id: Any) -> list[ToolCall] | None:
    """The calls as ToolCalls when every one names an offered tool with arguments its schema
    accepts; None when any does not (the answer is then returned as text)."""
    calls = []
    for call in raw:
        tool = next((t for t in tools if t.name == call.name), None)
        if tool is None or not Draft202012Validator(tool.parameters).is_valid(call.arguments):
            return None
        calls.append(ToolCall(new_id(), call.name, json.dumps(call.arguments, ensure_ascii=False)))
    return calls
