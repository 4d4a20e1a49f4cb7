"""Pick and build the backend for a resolved model; heavy imports happen only here, lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from easllm.config import EngineConfig
from easllm.engine.base import Engine
from easllm.errors import ModelNotFound

ENGINES = ("transformers", "llamacpp", "vllm", "fake")


class ModelFiles(Protocol):
    """A model on disk, as `models.resolve.ResolvedModel` describes it (engine/ sits below models/)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def format(self) -> str:
        """gguf | hf"""
        ...

    @property
    def default_engine(self) -> str: ...


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot run here (not installed, wrong model format)."""


def build_engine(config: EngineConfig, model: ModelFiles | None) -> Engine:
    name = config.engine or (model.default_engine if model else "fake")
    if name == "fake":
        from easllm.engine.backends.fake import FakeEngine

        return FakeEngine(context_length=config.ctx_size, max_queue=config.max_queue, keep_requests=100)
    if model is None:
        raise ModelNotFound("no model given")
    if name == "llamacpp":
        if model.format != "gguf":
            raise EngineUnavailable(f"--engine llamacpp needs a .gguf model; {model.path} is a HF directory")
        from easllm.engine.backends.llamacpp import LlamaCppEngine

        return LlamaCppEngine(model.path, config, model.name)
    if name == "transformers":
        if model.format != "hf":
            raise EngineUnavailable(
                f"--engine transformers needs a Hugging Face directory (config.json); {model.path} is GGUF: "
                "use --engine llamacpp"
            )
        from easllm.engine.backends.transformers_batching import TransformersBatchingEngine

        return TransformersBatchingEngine(model.path, config, model.name)
    if name == "vllm":
        from easllm.engine.backends.vllm import INSTALL_HINT, VllmEngine, vllm_installed

        if not vllm_installed():
            raise EngineUnavailable(INSTALL_HINT)
        if model.format != "hf":
            raise EngineUnavailable(
                f"--engine vllm needs a Hugging Face model directory (config.json); {model.path} is GGUF"
            )
        return VllmEngine(model.path, config, model.name)
    raise EngineUnavailable(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
