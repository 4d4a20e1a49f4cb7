"""What the batching engine needs from a model backend: one forward pass over a mixed batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from easllm.engine.base import EngineError
from easllm.engine.sampler import Grammar
from easllm.engine.vocab import Vocab

if TYPE_CHECKING:
    from easllm.engine.batch import Batch


class KVCacheFull(EngineError):
    """The backend found no room in its KV cache for the batch; nothing was computed."""


class ModelRunner(Protocol):
    """A forward pass plus the KV cache operations the prefix cache uses (`prefix_cache.KVOps`)."""

    @property
    def vocab(self) -> Vocab: ...  # read-only, so that a runner may hold its own kind of Vocab

    kv_cells: int  # KV cache size in tokens, shared by all sequences
    max_seqs: int  # sequences running at once
    num_seq_ids: int  # KV sequence ids 0 .. num_seq_ids - 1: running ones and cached prefixes
    max_batch_tokens: int  # tokens one forward pass may take

    def run(self, batch: Batch) -> list[np.ndarray]:
        """Feed every chunk of the batch at its positions in its slot's KV; return one row of
        logits per chunk that ends its sequence (`batch.sampled`), in order. The rows are valid
        until the next call. Raises KVCacheFull when the cache has no room."""
        ...

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Let sequence id `dst` share `src`'s cells at positions start .. end - 1."""
        ...

    def drop(self, seq_id: int, start: int = 0, end: int | None = None) -> None:
        """Drop a sequence id from its cells at positions start .. end - 1 (None: to its end)."""
        ...

    def can_continue(self, seq_id: int, n: int) -> bool:
        """Whether a sequence sharing `seq_id`'s first n cells can be computed on from there."""
        ...

    def grammar(self, gbnf: str, triggers: tuple[str, ...] = ()) -> Grammar:
        """A fresh grammar constraint, lazy when `triggers` are given (SamplingParams.grammar_triggers);
        raises InvalidRequest(param="grammar") on bad GBNF."""
        ...

    def close(self) -> None: ...
