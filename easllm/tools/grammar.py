"""A GBNF grammar whose every sentence is a well-formed call of one of the offered tools.

The JSON part comes from llama-cpp-python's JSON-schema converter (the one `response_format` uses),
imported lazily; each format adds its own wrapping (`<tool_call>...</tool_call>`, `[TOOL_CALLS][...]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from easllm.errors import InvalidRequest
from easllm.tools.formats import ToolFormat
from easllm.tools.types import Tool

CALL_RULE = "tool-call"
# llama.cpp's own C++ converter's whitespace: a space, or a line break and an indent. The Python
# port allows one space only, which forbids the indented JSON small models like to write.
SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'


def call_schema(tools: Sequence[Tool], arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call object: `{"name": <one of the tools>, <arguments_key>: {...}}`."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
            "required": ["name", arguments_key],
        }
        for t in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tool_call_grammar(fmt: ToolFormat, tools: Sequence[Tool], parallel: bool) -> str:
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter._rules["space"] = SPACE_RULE
    try:
        schema = converter.resolve_refs(call_schema(tools, fmt.arguments_key), "tools")
        rule = converter.visit(schema, CALL_RULE)
    except Exception as exc:  # the converter raises bare Exception/KeyError/ValueError on odd schemas
        raise InvalidRequest(
            f"a tool's parameters cannot be turned into a grammar: {str(exc) or type(exc).__name__}", "tools"
        ) from exc
    return f"root ::= {fmt.root_rule(rule, parallel)}\n{converter.format_grammar()}"
