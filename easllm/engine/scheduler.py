"""Who runs in the next forward pass: decode tokens first, then prefill chunks, within budgets.

Every step the scheduler fills one batch of at most `max_batch_tokens` tokens:
1. each running sequence that is decoding gets its one token (oldest first);
2. running sequences still prefilling get the next chunk of their prompt;
3. waiting sequences are admitted, first come first served, while a slot is free and the KV
   cache has room for the rest of their prompt; each starts with the longest prefix of its
   tokens the prefix cache holds (`prefix_cache.py`: shared cells, never the last prompt token)
   and a chunk of the rest.
A long prompt is thus fed in chunks across steps and never stalls the decodes. Cached prefixes
count as free cells: the batch evicts them, least recently used first, when it needs their
cells. When a decoding sequence needs a KV cell and none is left, the most recently admitted
running sequence is preempted: its cells become a cached prefix and it goes back to the front
of the queue, to be recomputed (or found in the cache) when there is room again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from easllm.engine.batch import Batch, Chunk
from easllm.engine.prefix_cache import PrefixCache, common_prefix_len
from easllm.engine.sampler import Sample
from easllm.engine.sequence import Sequence, SequenceStatus
from easllm.engine.types import FinishReason, TokenDelta

SHARED_WAIT_TOKENS = 32  # a prefix another sequence is computing, long enough to wait for


@dataclass(frozen=True)
class SchedulerConfig:
    max_seqs: int  # sequences running at once (KV slots)
    max_batch_tokens: int  # tokens per forward pass: decode tokens plus prefill chunks
    kv_cells: int  # KV cache cells shared by all running sequences


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: PrefixCache) -> None:
        self.config = config
        self.cache = cache  # owns the KV sequence ids and the cells, running and cached
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preempted_total = 0
        self.prefix_queries_total = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits_total = 0  # of those, tokens found there
        self._by_id: dict[str, Sequence] = {}

    @property
    def kv_cells_used(self) -> int:
        return self.cache.cells_used

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        budget = self.config.max_batch_tokens
        reserved = 0  # cells this batch takes
        chunks: list[Chunk] = []

        def free() -> int:  # cells neither running sequences nor this batch hold; cached ones count
            return self.config.kv_cells - self.cache.cells_locked - reserved

        for seq in list(self.running):  # 1. decodes
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncached != 1:
                continue
            while free() < 1 and seq.status is SequenceStatus.RUNNING:
                self._preempt(self.running[-1])
            if seq.status is SequenceStatus.RUNNING:
                chunks.append(self._chunk(seq, 1))
                budget -= 1
                reserved += 1

        pending = 0  # cells the running prefills still need after this step
        for seq in self.running:  # 2. prefills already under way
            if seq.num_uncached > 1:
                n = min(seq.num_uncached, budget, free())
                if n > 0:
                    chunks.append(self._chunk(seq, n))
                    budget -= n
                    reserved += n
                pending += seq.num_uncached - max(n, 0)

        while self.waiting and budget > 0 and len(self.running) < self.config.max_seqs:  # 3. admissions
            seq = self.waiting[0]
            match = self.cache.match(seq.token_ids, len(seq) - 1)  # the last token gives the logits
            if self._prefilling_shares(seq, match.length):
                break  # it will reuse those cells once computed, rather than compute a copy
            if len(seq) - match.length + 1 > free() - pending - self.cache.cells_to_lock(match):
                break  # first come first served: no one overtakes the head of the queue
            self.waiting.popleft()
            seq.slot = self.cache.admit(match)
            seq.num_cached = match.length
            seq.status = SequenceStatus.RUNNING
            if seq.num_cached_prompt is None:
                seq.num_cached_prompt = match.length
                self.prefix_queries_total += seq.num_prompt_tokens
                self.prefix_hits_total += min(match.length, seq.num_prompt_tokens)
            self.running.append(seq)
            n = min(seq.num_uncached, budget)
            chunks.append(self._chunk(seq, n))
            budget -= n
            reserved += n
            pending += seq.num_uncached - n
        self.cache.make_room(reserved)
        return Batch(chunks)

    def _prefilling_shares(self, seq: Sequence, matched: int) -> bool:
        """Whether a running sequence is computing a longer prefix of this one's tokens right now
        (the same system prompt, the same retrieved chunks), worth a step's wait: many tokens,
        or most of what this one would compute itself."""
        for other in self.running:
            if other.num_cached >= other.num_prompt_tokens or not self.cache.enabled:
                continue
            shared = common_prefix_len(seq.token_ids, other.token_ids, 0, other.num_prompt_tokens)
            gain = min(shared, len(seq) - 1) - max(matched, other.num_cached)
            if gain >= SHARED_WAIT_TOKENS or (gain > 0 and 2 * gain >= len(seq) - matched):
                return True
        return False

    def update(self, batch: Batch, samples: list[Sample]) -> list[TokenDelta]:
        """Record what the forward pass computed and append the sampled tokens; finished
        sequences give back their slot and KV cells."""
        for chunk in batch.chunks:
            chunk.seq.num_cached += len(chunk.token_ids)
            if chunk.seq.slot is not None:
                self.cache.extend(chunk.seq.slot, chunk.token_ids)
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

    def make_room(self) -> bool:
        """When the backend's KV cache is fuller than this scheduler counts (sliding-window
        layers keep shared cells): drop the cached prefixes, else preempt the newest sequence."""
        if self.cache.evict_all() > 0:
            return True
        if len(self.running) < 2:
            return False
        self._preempt(self.running[-1])
        return True

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        start = seq.num_cached
        return Chunk(seq, start, seq.token_ids[start : start + n])

    def _preempt(self, seq: Sequence) -> None:
        self._free_slot(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.preempted_total += 1

    def _remove(self, seq: Sequence) -> None:
        self._by_id.pop(seq.request_id, None)
        if seq.slot is not None:  # running (it may already be marked finished)
            self._free_slot(seq)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _free_slot(self, seq: Sequence) -> None:
        assert seq.slot is not None
        self.cache.release(seq.slot)  # its cells stay as a cached prefix
        seq.slot = None
