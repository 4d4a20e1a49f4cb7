"""Plain data of tool calling: the functions offered, how the model must use them, the calls made."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ChoiceMode(StrEnum):
    NONE = "none"  # tools are described but no call may be made
    AUTO = "auto"  # the model decides
    REQUIRED = "required"  # at least one call
    NAMED = "named"  # exactly one call of `ToolChoice.name`


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_template_dict(self) -> dict[str, Any]:
        """The OpenAI shape every tool-aware chat template reads (`tool.function.name`, ...)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode = ChoiceMode.AUTO
    name: str | None = None  # for NAMED


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: ToolChoice = ToolChoice()
    parallel: bool = True  # more than one call per answer

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    @property
    def callable_tools(self) -> tuple[Tool, ...]:
        """The tools a call may name: the named one only, under a named tool_choice."""
        if self.choice.mode is ChoiceMode.NAMED:
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it

    def arguments_object(self) -> Any:
        return json.loads(self.arguments)


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id(length: int = 24, prefix: str = "call_") -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))
