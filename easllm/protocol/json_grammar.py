"""JSON output formats -> GBNF grammars for grammar-constrained decoding.

llama-cpp-python ships the converter (pure Python, imported lazily so that services on other
engines never load it); the engine receives only the grammar text in `SamplingParams.grammar`.
"""

from __future__ import annotations

import json
from typing import Any

from easllm.errors import InvalidRequest


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def json_schema_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    """A grammar whose every sentence is a JSON document valid under `schema`."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare Exception/KeyError/ValueError on odd schemas
        raise InvalidRequest(
            f"the JSON schema cannot be turned into a grammar: {str(exc) or type(exc).__name__}", param
        ) from exc
    return grammar
