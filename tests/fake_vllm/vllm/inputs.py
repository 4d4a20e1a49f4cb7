"""Fake vllm.inputs: TokensPrompt is a TypedDict in vLLM, so a dict here."""

from typing import Any


def TokensPrompt(**kwargs: Any) -> dict[str, Any]:
    return dict(kwargs)
