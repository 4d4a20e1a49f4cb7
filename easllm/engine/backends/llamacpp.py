"""llama.cpp through llama-cpp-python: GGUF models, one sequence at a time on a worker thread."""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.sequential import SequentialEngine
from easllm.engine.types import GenerationRequest, ModelInfo

log = logging.getLogger(__name__)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppEngine(SequentialEngine):
    name = "llamacpp"

    def __init__(self, gguf_path: Path, config: EngineConfig, display_name: str) -> None:
        super().__init__(display_name, config.max_queue)
        self.gguf_path = gguf_path
        self.config = config
        self._llm: Any = None
        self._add_bos = False

    def _load(self) -> ModelInfo:
        from llama_cpp import Llama

        threads = self.config.threads or default_threads()
        llm = Llama(
            model_path=str(self.gguf_path),
            n_ctx=self.config.ctx_size,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self._llm = llm
        model = llm._model
        self._add_bos = bool(model.add_bos_token())
        n_ctx = min(llm.n_ctx(), model.n_ctx_train())
        return ModelInfo(
            name=self.display_name,
            engine=self.name,
            context_length=n_ctx,
            chat_template=llm.metadata.get("tokenizer.chat_template"),
            bos_token=_token_text(model, llm.token_bos()),
            eos_token=_token_text(model, llm.token_eos()),
        )

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=add_special and self._add_bos, special=True))

    def _piece(self, token: int) -> bytes:
        import llama_cpp

        size = 64
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(self._llm._model.vocab, token, buf, size, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._llm._model.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def _generate_tokens(self, req: GenerationRequest) -> Iterator[tuple[int, str]]:
        import llama_cpp

        s = req.sampling
        llm = self._llm
        llm.set_seed(s.seed if s.seed is not None else random.randrange(2**31))
        grammar = llama_cpp.LlamaGrammar.from_string(s.grammar, verbose=False) if s.grammar else None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        for token in llm.generate(
            req.prompt_token_ids,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=0.0,
            typical_p=1.0,
            temp=s.temperature,
            repeat_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            grammar=grammar,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return
            yield token, decoder.decode(self._piece(token))


def _token_text(model: Any, token: int) -> str:
    try:
        return model.token_get_text(token) if token >= 0 else ""
    except (UnicodeDecodeError, ValueError):
        return ""
