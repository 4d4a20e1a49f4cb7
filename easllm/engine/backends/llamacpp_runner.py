"""llama.cpp ModelRunner: one `llama_decode` over a batch mixing prefill chunks and decode tokens.

One context with `n_seq_max` sequence ids in one unified KV cache of `kv_cells` cells: every
running sequence is a llama.cpp `seq_id`, any sequence may use any free cell, and several ids may
share cells (`llama_memory_seq_cp`): the prefix cache (`engine/prefix_cache.py`) keeps finished
sequences' cells under idle ids, so there are more ids than running sequences, and drops them
with `llama_memory_seq_rm`.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from easllm.config import EngineConfig
from easllm.engine.backends.llamacpp_grammar import LlamaGrammar
from easllm.engine.base import EngineError
from easllm.engine.batch import Batch
from easllm.engine.runner import KVCacheFull

log = logging.getLogger(__name__)


class LlamaVocab:
    def __init__(self, vocab: Any) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self._vocab = vocab
        self.size = llama_cpp.llama_vocab_n_tokens(vocab)
        self._pieces: dict[int, bytes] = {}
        self._buffer = ctypes.create_string_buffer(256)

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            n = self._llama.llama_token_to_piece(self._vocab, token, self._buffer, 256, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
                cached = buffer.raw[:n]
            else:
                cached = self._buffer.raw[:n]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))


class _LlamaBatch:
    """A `llama_batch` over numpy arrays this object owns, one sequence id per token."""

    def __init__(self, capacity: int) -> None:
        import llama_cpp

        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        int_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_id.ctypes.data
        self._seq_id_rows = (int_p * capacity)(
            *(ctypes.cast(ctypes.c_void_p(base + 4 * i), int_p) for i in range(capacity))
        )
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(int_p),
            embd=None,
            pos=self.pos.ctypes.data_as(int_p),
            n_seq_id=self.n_seq_id.ctypes.data_as(int_p),
            seq_id=self._seq_id_rows,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class LlamaCppRunner:
    def __init__(self, gguf_path: Path, config: EngineConfig, threads: int) -> None:
        import llama_cpp
        from llama_cpp import _internals, _logger

        self._llama = llama_cpp
        _logger.set_verbose(log.isEnabledFor(logging.DEBUG))  # llama.cpp's own log goes to stderr
        llama_cpp.llama_backend_init()
        self.model = _internals.LlamaModel(
            path_model=str(gguf_path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        self.context_length = min(config.ctx_size, self.model.n_ctx_train())
        most_ids = llama_cpp.llama_max_parallel_sequences()
        self.max_seqs = max(1, min(config.max_batch, most_ids - int(config.prefix_cache)))
        # cached prefixes each keep an idle id: 3 per running sequence (16 conversations on 8 slots)
        self.num_seq_ids = min(most_ids, 4 * self.max_seqs) if config.prefix_cache else self.max_seqs
        self.max_batch_tokens = max(config.max_batch_tokens, self.max_seqs)
        kv_cells = config.kv_size or self.context_length * min(4, self.max_seqs)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max(kv_cells, self.context_length)
        params.n_batch = params.n_ubatch = self.max_batch_tokens
        params.n_seq_max = self.num_seq_ids
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one pool of cells for all sequences, each may grow to the whole
        params.swa_full = False  # sliding-window layers keep only their window: less memory
        params.no_perf = True
        self._context = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self._ctx = self._context.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_swa = int(llama_cpp.llama_model_n_swa(self.model.model)) if self._has_swa() else 0
        self.kv_cells = llama_cpp.llama_n_ctx(self._ctx)
        self.vocab = LlamaVocab(self.model.vocab)
        self._batch = _LlamaBatch(self.max_batch_tokens)
        log.info(
            "llama.cpp: %d sequences, %d KV cells shared, %d tokens per step, context %d per sequence",
            self.max_seqs,
            self.kv_cells,
            self.max_batch_tokens,
            self.context_length,
        )

    def run(self, batch: Batch) -> list[np.ndarray]:
        b = self._batch
        n = 0
        outputs: list[int] = []
        for chunk in batch.chunks:
            k = len(chunk.token_ids)
            b.token[n : n + k] = chunk.token_ids
            b.pos[n : n + k] = np.arange(chunk.start, chunk.start + k, dtype=np.int32)
            assert chunk.seq.slot is not None  # the scheduler batches running sequences only
            b.seq_id[n : n + k] = chunk.seq.slot
            b.logits[n : n + k] = 0
            if chunk.samples:
                b.logits[n + k - 1] = 1
                outputs.append(n + k - 1)
            n += k
        b.struct.n_tokens = n
        status = self._llama.llama_decode(self._ctx, b.struct)
        if status == 1:
            raise KVCacheFull("llama.cpp found no KV cells for the batch")
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        n_vocab = self.vocab.size
        return [
            np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._ctx, i), shape=(n_vocab,))
            for i in outputs
        ]

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        self._llama.llama_memory_seq_cp(self._memory, src, dst, start, end)

    def drop(self, seq_id: int, start: int = 0, end: int | None = None) -> None:
        self._llama.llama_memory_seq_rm(self._memory, seq_id, start, -1 if end is None else end)

    def can_continue(self, seq_id: int, n: int) -> bool:
        """Sliding-window layers overwrite cells outside every holder's window: continuing at
        position n needs the last window before it (llama-server's check)."""
        if self._n_swa <= 0:
            return True
        return int(self._llama.llama_memory_seq_pos_min(self._memory, seq_id)) <= max(0, n - self._n_swa)

    def _has_swa(self) -> bool:
        return hasattr(self._llama, "llama_model_n_swa")

    def grammar(self, gbnf: str, triggers: tuple[str, ...] = ()) -> LlamaGrammar:
        return LlamaGrammar(self.model.vocab, self.vocab.size, gbnf, triggers)

    def close(self) -> None:
        self._context.close()
        self.model.close()
