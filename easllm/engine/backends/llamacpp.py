"""llama.cpp through llama-cpp-python: GGUF models, many sequences decoded together (batching.py)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from easllm.config import EngineConfig
from easllm.engine.batching import BatchingEngine
from easllm.engine.types import FEATURES, GRAMMAR_TRIGGERS, ModelInfo
from easllm.errors import NotReady

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaModel

    from easllm.engine.runner import ModelRunner

log = logging.getLogger(__name__)

OMP_WAIT_POLICIES = ("auto", "active", "passive")


def set_omp_wait_policy(policy: str) -> None:
    """How llama.cpp's OpenMP threads wait at barriers. `auto` leaves OpenMP's own default (spin a
    little, then sleep: what llama-server runs with) or the environment's OMP_WAIT_POLICY;
    `passive` sleeps at once, for a machine shared with other busy processes (spinning stalled
    decode steps there), `active` always spins. Measured on a quiet 2-core machine, gemma3-270m:
    PASSIVE 33 tok/s single stream against 60 with ACTIVE. libgomp reads the variable once, when
    llama_cpp is first imported."""
    if policy not in OMP_WAIT_POLICIES:
        raise ValueError(f"omp_wait_policy must be one of {', '.join(OMP_WAIT_POLICIES)}")
    if policy == "auto":
        return
    if "llama_cpp" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").lower() != policy:
        log.warning("llama_cpp is already loaded: OMP_WAIT_POLICY=%s takes effect on restart", policy.upper())
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppEngine(BatchingEngine):
    name = "llamacpp"

    def __init__(self, gguf_path: Path, config: EngineConfig, display_name: str) -> None:
        super().__init__(display_name, config)
        set_omp_wait_policy(config.omp_wait_policy)
        self.gguf_path = gguf_path
        self._model: LlamaModel | None = None
        self._add_bos = False

    def _load(self) -> tuple[ModelInfo, ModelRunner]:
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
        add_bos = add_special and self._add_bos
        ids: list[int] = self._model.tokenize(text.encode(), add_bos=add_bos, special=True)
        return ids


def _token_text(model: LlamaModel, token: int) -> str:
    try:
        return model.token_get_text(token) if token >= 0 else ""
    except (UnicodeDecodeError, ValueError):
        return ""
