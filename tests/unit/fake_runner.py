"""A ModelRunner without a model: it keeps a real KV cache of shared cells and checks how it is used.

Each sequence id holds a list of cells by position; a cell is an object that several sequence ids
may share (`copy`, as llama.cpp's `llama_memory_seq_cp`), and the cache counts a shared cell once.
Its "model" picks the next token from everything in the sequence id's cells, so a scheduler or a
prefix cache that feeds a wrong token, position or slot, or shares the wrong cells, changes the
text. `reference` generates the same text the slow, obvious way, for comparison.
"""

from __future__ import annotations

import time

import numpy as np

from easllm.config import EngineConfig
from easllm.engine.batch import Batch
from easllm.engine.batching import BatchingEngine
from easllm.engine.runner import KVCacheFull
from easllm.engine.types import FEATURES, ModelInfo
from easllm.errors import InvalidRequest

EOS, BOS = 0, 1
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # tokens 2 .. 27; 28 is a space; 29, 30 are the bytes of "é"
SPACE, E_ACUTE_1, E_ACUTE_2 = 28, 29, 30


class FakeVocab:
    size = 31

    def piece(self, token: int) -> bytes:
        if 2 <= token < 28:
            return LETTERS[token - 2].encode()
        return {SPACE: b" ", E_ACUTE_1: b"\xc3", E_ACUTE_2: b"\xa9"}.get(token, b"")

    def is_eog(self, token: int) -> bool:
        return token == EOS


def encode(text: str) -> list[int]:
    return [BOS] + [SPACE if c == " " else LETTERS.index(c) + 2 for c in text]


def next_token(tokens: list[int]) -> int:
    if tokens[-2:] == [LETTERS.index("z") + 2] * 2:
        return EOS
    h = 0
    for t in tokens:
        h = (h * 31 + t) % 1_000_003
    return 2 + h % 27  # a letter, or 28: a space


def reference(prompt: list[int], max_new_tokens: int) -> str:
    tokens = list(prompt)
    out = b""
    for _ in range(max_new_tokens):
        token = next_token(tokens)
        if token == EOS:
            break
        tokens.append(token)
        out += FakeVocab().piece(token)
    return out.decode()


class FakeGrammar:
    """'GBNF' here is the set of letters allowed; the end of sequence is always allowed."""

    def __init__(self, letters: str) -> None:
        self.allowed = {LETTERS.index(c) + 2 for c in letters} | {EOS}
        self.accepted: list[int] = []
        self.masks = 0
        self.closed = False

    def allows(self, token: int) -> bool:
        return token in self.allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self.masks += 1
        out = np.full_like(logits, -np.inf)
        ids = list(self.allowed)
        out[ids] = logits[ids]
        return out

    def accept(self, token: int) -> None:
        assert token in self.allowed, "a token the grammar forbids was accepted"
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


class Cell:
    __slots__ = ("token",)

    def __init__(self, token: int) -> None:
        self.token = token


class FakeRunner:
    def __init__(
        self,
        max_seqs: int = 4,
        max_batch_tokens: int = 16,
        kv_cells: int = 256,
        delay: float = 0.0,
        num_seq_ids: int | None = None,
    ) -> None:
        self.vocab = FakeVocab()
        self.delay = delay  # seconds per forward pass
        self.max_seqs = max_seqs
        self.num_seq_ids = num_seq_ids or 4 * max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv_cells = kv_cells
        self.cache: dict[int, list[Cell | None]] = {}  # seq id -> its cells at positions 0, 1, ...
        self.batches: list[list[tuple[str, int, int]]] = []  # per run: (request id, start, n tokens)
        self.released: list[int] = []  # seq ids dropped whole
        self.copies: list[tuple[int, int, int, int]] = []  # (src, dst, start, end)
        self.grammars: list[FakeGrammar] = []
        self.fail_next: Exception | None = None
        self.closed = False

    def run(self, batch: Batch) -> list[np.ndarray]:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        if self.delay:
            time.sleep(self.delay)
        assert 0 < batch.num_tokens <= self.max_batch_tokens, batch.num_tokens
        if self.kv_cells_used() + batch.num_tokens > self.kv_cells:
            raise KVCacheFull("no room")
        slots = [c.seq.slot for c in batch.chunks]
        assert len(set(slots)) == len(slots), "one chunk per sequence per step"
        self.batches.append([(c.seq.request_id, c.start, len(c.token_ids)) for c in batch.chunks])
        rows = []
        for chunk in batch.chunks:
            assert chunk.seq.slot is not None and 0 <= chunk.seq.slot < self.num_seq_ids
            cache = self.cache.setdefault(chunk.seq.slot, [])
            assert chunk.start == len(cache), "a chunk must continue its slot's cache"
            assert None not in cache, "a hole in the slot's cells"
            tokens = [c.token for c in cache if c is not None]
            assert tokens == chunk.seq.token_ids[: chunk.start], "the slot's cells are another text"
            cache.extend(Cell(t) for t in chunk.token_ids)
            if chunk.samples:
                rows.append(self._logits(tokens + chunk.token_ids))
        return rows

    def _logits(self, tokens: list[int]) -> np.ndarray:
        row = np.linspace(-2.0, 2.0, self.vocab.size, dtype=np.float32)
        row[next_token(tokens)] = 8.0
        return row

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        source, target = self.cache.get(src, []), self.cache.setdefault(dst, [])
        assert len(source) >= end and None not in source[start:end], "copying cells src lacks"
        assert len(target) == start or all(c is None for c in target[start:end]), "dst holds cells there"
        target[start:end] = source[start:end]
        self.copies.append((src, dst, start, end))

    def drop(self, seq_id: int, start: int = 0, end: int | None = None) -> None:
        cells = self.cache.get(seq_id, [])
        if end is None or end >= len(cells):
            del cells[start:]
        else:
            cells[start:end] = [None] * (end - start)
        if not cells:
            self.cache.pop(seq_id, None)
            if start == 0:
                self.released.append(seq_id)

    def can_continue(self, seq_id: int, n: int) -> bool:
        return len(self.cache.get(seq_id, [])) >= n

    def kv_cells_used(self) -> int:
        return len({id(c) for cells in self.cache.values() for c in cells if c is not None})

    def grammar(self, gbnf: str, triggers: tuple[str, ...] = ()) -> FakeGrammar:
        if not gbnf or not set(gbnf) <= set(LETTERS):
            raise InvalidRequest("the grammar does not parse", "grammar")
        grammar = FakeGrammar(gbnf)
        self.grammars.append(grammar)
        return grammar

    def close(self) -> None:
        self.cache.clear()  # as a closed llama.cpp context: an engine started again finds it empty
        self.closed = True


class FakeBatchingEngine(BatchingEngine):
    """The batching engine over a FakeRunner; `context_length` is the per-sequence context."""

    name = "fake-batching"

    def __init__(
        self,
        runner: FakeRunner | None = None,
        context_length: int = 128,
        max_queue: int = 16,
        prefix_cache: bool = True,
    ) -> None:
        config = EngineConfig(engine="fake", max_queue=max_queue, prefix_cache=prefix_cache)
        super().__init__("fake-batching-model", config)
        self.fake_runner = runner or FakeRunner()
        self.context_length = context_length

    def _load(self) -> tuple[ModelInfo, FakeRunner]:
        info = ModelInfo(self.display_name, self.name, self.context_length, None, features=FEATURES)
        return info, self.fake_runner

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return encode(text) if add_special else encode(text)[1:]


def offline_engine(
    runner: FakeRunner | None = None, context_length: int = 128, prefix_cache: bool = True
) -> FakeBatchingEngine:
    """An engine with its model attached but no thread: call `step()` by hand."""
    engine = FakeBatchingEngine(runner, context_length, prefix_cache=prefix_cache)
    engine.attach(*engine._load())
    return engine
