"""Who runs in the next forward pass: decode tokens first, then prefill chunks, within budgets.

Every step the scheduler fills one batch of at most `max_batch_tokens` tokens:
1. each running sequence that is decoding gets its one token (oldest first);
2. running sequences still prefilling get the next chunk of their prompt;
3. waiting sequences are admitted, first come first served, while a slot is free and the KV
   cache has room for their whole prompt; each starts with a chunk of its prompt.
A long prompt is thus fed in chunks across steps and never stalls the decodes. When a decoding
sequence needs a KV cell and none is left, the most recently admitted running sequence is
preempted: its cells are freed and it goes back to the front of the queue, to be recomputed
(prompt and answer so far) when there is room again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from easllm.engine.sampler import Sample
from easllm.engine.sequence import Sequence, SequenceStatus
from easllm.engine.types import FinishReason, TokenDelta


@dataclass(frozen=True)
class SchedulerConfig:
    max_seqs: int  # sequences running at once (KV slots)
    max_batch_tokens: int  # tokens per forward pass: decode tokens plus prefill chunks
    kv_cells: int  # KV cache cells shared by all running sequences


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


class Scheduler:
    def __init__(self, config: SchedulerConfig, release: Callable[[int], None]) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preempted_total = 0
        self._release = release  # frees a slot's KV cells in the backend
        self._free_slots = list(range(config.max_seqs - 1, -1, -1))
        self._by_id: dict[str, Sequence] = {}

    @property
    def kv_cells_used(self) -> int:
        return sum(s.num_cached for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        budget = self.config.max_batch_tokens
        free = self.config.kv_cells - self.kv_cells_used
        chunks: list[Chunk] = []

        for seq in list(self.running):  # 1. decodes
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncached != 1:
                continue
            while free < 1 and seq.status is SequenceStatus.RUNNING:
                free += self._preempt(self.running[-1])
            if seq.status is SequenceStatus.RUNNING:
                chunks.append(self._chunk(seq, 1))
                budget -= 1
                free -= 1

        pending = 0  # cells the running prefills still need after this step
        for seq in self.running:  # 2. prefills already under way
            if seq.num_uncached > 1:
                n = min(seq.num_uncached, budget, free)
                if n > 0:
                    chunks.append(self._chunk(seq, n))
                    budget -= n
                    free -= n
                pending += seq.num_uncached - max(n, 0)

        while self.waiting and budget > 0 and self._free_slots:  # 3. admissions
            seq = self.waiting[0]
            if seq.num_uncached + 1 > free - pending:
                break  # first come first served: no one overtakes the head of the queue
            self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncached, budget)
            chunks.append(self._chunk(seq, n))
            budget -= n
            free -= n
            pending += seq.num_uncached - n
        return Batch(chunks)

    def update(self, batch: Batch, samples: list[Sample]) -> list[TokenDelta]:
        """Record what the forward pass computed and append the sampled tokens; finished
        sequences give back their slot and KV cells."""
        for chunk in batch.chunks:
            chunk.seq.num_cached += len(chunk.token_ids)
        deltas = []
        for seq, sample in zip(batch.sampled, samples, strict=True):
            delta = seq.append(sample)
            if seq.finish_reason is not None:
                self._remove(seq)
            deltas.append(delta)
        return deltas

    def abort(self, request_id: str) -> TokenDelta | None:
        """Remove a sequence wherever it is; None when it is not here (finished or unknown)."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        self._remove(seq)
        return seq.finish(FinishReason.ABORT)

    def fail(self, seq: Sequence) -> None:
        """Drop a sequence the backend could not compute (the engine reports the error)."""
        self._remove(seq)
        seq.finish(FinishReason.ABORT)

    def preempt_newest(self) -> bool:
        """Make room when the backend's KV cache is fuller than this scheduler counts."""
        if len(self.running) < 2:
            return False
        self._preempt(self.running[-1])
        return True

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        start = seq.num_cached
        return Chunk(seq, start, seq.token_ids[start : start + n])

    def _preempt(self, seq: Sequence) -> int:
        cells = seq.num_cached
        self._free_slot(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preempted_total += 1
        return cells

    def _remove(self, seq: Sequence) -> None:
        self._by_id.pop(seq.request_id, None)
        if seq.slot is not None:  # running (it may already be marked finished)
            self._free_slot(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _free_slot(self, seq: Sequence) -> None:
        assert seq.slot is not None
        self._release(seq.slot)
        self._free_slots.append(seq.slot)
        seq.slot = None
