"""One forward pass's work: a prefill chunk or a decode token per sequence (the scheduler fills it)."""

from __future__ import annotations

from dataclasses import dataclass

from easllm.engine.sequence import Sequence


@dataclass
class Chunk:
    seq: Sequence
    start: int  # position of the first token in the sequence
    token_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of its sequence, so a token is sampled after it."""
        return self.start + len(self.token_ids) == len(self.seq)


@dataclass
class Batch:
    chunks: list[Chunk]

    @property
    def sampled(self) -> list[Sequence]:
        return [c.seq for c in self.chunks if c.samples]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)
