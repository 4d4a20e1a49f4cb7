"""llama.cpp through llama-cpp-python: GGUF models, many sequences decoded together (batching.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.batching import BatchingEngine
from easllm.engine.types import FEATURES, GRAMMAR_TRIGGERS, ModelInfo
from easllm.errors import NotReady

log = logging.getLogger(__name__)

# llama.cpp's OpenMP threads sleep at barriers instead of spinning, unless the environment says
# otherwise (OMP_WAIT_POLICY=ACTIVE). Spinning stalled decode steps for seconds whenever anything
# else wanted the cores: measured 4-19 vs 17-28 tokens/s single-stream on a shared 2-core machine.
# libgomp reads this once, when llama_cpp is first imported, which happens after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppEngine(BatchingEngine):
    name = "llamacpp"

    def __init__(self, gguf_path: Path, config: EngineConfig, display_name: str) -> None:
        super().__init__(display_name, config)
        self.gguf_path = gguf_path
        self._model: Any = None
        self._add_bos = False

    def _load(self) -> tuple[ModelInfo, Any]:
        from easllm.engine.backends.llamacpp_runner import LlamaCppRunner

        runner = LlamaCppRunner(self.gguf_path, self.config, self.config.threads or default_threads())
        model = runner.model
        self._model = model
        self._add_bos = bool(model.add_bos_token())
        info = ModelInfo(
            name=self.display_name,
            engine=self.name,
            context_length=runner.context_length,
            chat_template=model.metadata().get("tokenizer.chat_template"),
            bos_token=_token_text(model, model.token_bos()),
            eos_token=_token_text(model, model.token_eos()),
            features=FEATURES | {GRAMMAR_TRIGGERS},
        )
        return info, runner

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if self._model is None:
            raise NotReady("the model is still loading")
        return self._model.tokenize(text.encode(), add_bos=add_special and self._add_bos, special=True)


def _token_text(model: Any, token: int) -> str:
    try:
        return model.token_get_text(token) if token >= 0 else ""
    except (UnicodeDecodeError, ValueError):
        return ""
