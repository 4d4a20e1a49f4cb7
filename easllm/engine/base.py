"""The one interface every backend fits: routes, WebSocket, WebUI and RAG are written against it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

from easllm.engine.types import EngineHealth, GenerationRequest, ModelInfo, TokenDelta
from easllm.errors import EngineError, EngineOverloaded  # defined with the other typed errors

__all__ = ["Engine", "EngineError", "EngineOverloaded"]


@runtime_checkable
class Engine(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`, special tokens in it parsed; `add_special` adds what the model's
        tokenizer puts in front of a text (BOS, where the model has one)."""
        ...

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream the answer; closing the generator early (`aclose`) aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def health(self) -> EngineHealth: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
