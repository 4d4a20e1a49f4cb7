"""What the batching engine needs from a model backend: one forward pass over a mixed batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from easllm.engine.base import EngineError
from easllm.engine.sampler import Grammar

if TYPE_CHECKING:
    from easllm.engine.scheduler import Batch


class KVCacheFull(EngineError):
    """The backend found no room in its KV cache for the batch; nothing was computed."""


class Vocab(Protocol):
    size: int  # token ids are 0 .. size - 1

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether the token ends generation (EOS, EOT, ...)."""
        ...


class ModelRunner(Protocol):
    vocab: Vocab
    kv_cells: int  # KV cache size in tokens, shared by all sequences
    max_seqs: int  # sequences the cache holds at once; slots are 0 .. max_seqs - 1
    max_batch_tokens: int  # tokens one forward pass may take

    def run(self, batch: Batch) -> list[np.ndarray]:
        """Feed every chunk of the batch at its positions in its slot's KV; return one row of
        logits per chunk that ends its sequence (`batch.sampled`), in order. The rows are valid
        until the next call. Raises KVCacheFull when the cache has no room."""
        ...

    def release(self, slot: int) -> None:
        """Drop everything the KV cache holds for a slot, so the slot can start a new sequence."""
        ...

    def kv_cells_used(self) -> int: ...

    def grammar(self, gbnf: str, triggers: tuple[str, ...] = ()) -> Grammar:
        """A fresh grammar constraint, lazy when `triggers` are given (SamplingParams.grammar_triggers);
        raises InvalidRequest(param="grammar") on bad GBNF."""
        ...

    def close(self) -> None: ...
