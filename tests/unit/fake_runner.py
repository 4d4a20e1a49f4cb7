"""A ModelRunner without a model: it keeps a real per-slot token cache and checks how it is used.

Its "model" picks the next token from everything in the slot's cache, so a scheduler that feeds
a wrong token, position or slot changes the text. `reference` generates the same text the
slow, obvious way, for comparison.
"""

from __future__ import annotations

import time

import numpy as np

from easllm.config import EngineConfig
from easllm.engine.batching import BatchingEngine
from easllm.engine.runner import KVCacheFull
from easllm.engine.scheduler import Batch
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


class FakeRunner:
    def __init__(
        self, max_seqs: int = 4, max_batch_tokens: int = 16, kv_cells: int = 256, delay: float = 0.0
    ) -> None:
        self.vocab = FakeVocab()
        self.delay = delay  # seconds per forward pass
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv_cells = kv_cells
        self.cache: dict[int, list[int]] = {}  # slot -> tokens at positions 0, 1, ...
        self.batches: list[list[tuple[str, int, int]]] = []  # per run: (request id, start, n tokens)
        self.released: list[int] = []
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
            assert chunk.seq.slot is not None and 0 <= chunk.seq.slot < self.max_seqs
            cache = self.cache.setdefault(chunk.seq.slot, [])
            assert chunk.start == len(cache), "a chunk must continue its slot's cache"
            cache.extend(chunk.token_ids)
            if chunk.samples:
                rows.append(self._logits(cache))
        return rows

    def _logits(self, tokens: list[int]) -> np.ndarray:
        row = np.linspace(-2.0, 2.0, self.vocab.size, dtype=np.float32)
        row[next_token(tokens)] = 8.0
        return row

    def release(self, slot: int) -> None:
        self.cache.pop(slot, None)
        self.released.append(slot)

    def kv_cells_used(self) -> int:
        return sum(len(c) for c in self.cache.values())

    def grammar(self, gbnf: str, triggers: tuple[str, ...] = ()) -> FakeGrammar:
        if not gbnf or not set(gbnf) <= set(LETTERS):
            raise InvalidRequest("the grammar does not parse", "grammar")
        grammar = FakeGrammar(gbnf)
        self.grammars.append(grammar)
        return grammar

    def close(self) -> None:
        self.closed = True


class FakeBatchingEngine(BatchingEngine):
    """The batching engine over a FakeRunner; `context_length` is the per-sequence context."""

    name = "fake-batching"

    def __init__(
        self, runner: FakeRunner | None = None, context_length: int = 128, max_queue: int = 16
    ) -> None:
        super().__init__("fake-batching-model", EngineConfig(engine="fake", max_queue=max_queue))
        self.fake_runner = runner or FakeRunner()
        self.context_length = context_length

    def _load(self) -> tuple[ModelInfo, FakeRunner]:
        info = ModelInfo(self.display_name, self.name, self.context_length, None, features=FEATURES)
        return info, self.fake_runner

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return encode(text) if add_special else encode(text)[1:]


def offline_engine(runner: FakeRunner | None = None, context_length: int = 128) -> FakeBatchingEngine:
    """An engine with its model attached but no thread: call `step()` by hand."""
    engine = FakeBatchingEngine(runner, context_length)
    engine.attach(*engine._load())
    return engine
