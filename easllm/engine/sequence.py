"""One request inside the batching engine: its tokens, its place in the KV cache, its sampler."""

from __future__ import annotations

import enum

from easllm.engine.detokenizer import Detokenizer
from easllm.engine.sampler import NO_TOKEN, Sample, Sampler
from easllm.engine.stop import StopMatcher
from easllm.engine.types import FinishReason, GenerationRequest, TokenDelta, TokenLogprob, Usage
from easllm.engine.vocab import Vocab


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no KV cells
    RUNNING = "running"  # holds a slot and KV cells
    FINISHED = "finished"


class Sequence:
    def __init__(self, req: GenerationRequest, sampler: Sampler, vocab: Vocab, max_len: int) -> None:
        self.request_id = req.request_id
        self.params = req.sampling
        self.token_ids: list[int] = list(req.prompt_token_ids)  # prompt, then the answer so far
        self.num_prompt_tokens = len(self.token_ids)
        self.max_len = max_len  # this sequence's context: prompt plus answer
        self.sampler = sampler
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None  # its sequence id in the KV cache while running
        self.num_cached = 0  # leading tokens whose keys and values are in the KV cache
        self.num_cached_prompt: int | None = None  # prompt tokens the prefix cache gave at admission
        self.finish_reason: FinishReason | None = None
        self._vocab = vocab
        self._detokenizer = Detokenizer(vocab.piece)
        self._stops = StopMatcher(self.params.stop)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"Sequence({self.request_id}, {self.status.value}, {self.num_cached}/{len(self)} cached)"

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncached(self) -> int:
        """Tokens still to feed: the prompt (or its rest) while prefilling, then the last token."""
        return len(self.token_ids) - self.num_cached

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def append(self, sample: Sample) -> TokenDelta:
        """Take the sampled token; the delta carries its text, and `finish_reason` if it ends here."""
        token = sample.token
        if token == NO_TOKEN or self._vocab.is_eog(token):
            return self.finish(FinishReason.STOP)
        self.token_ids.append(token)
        self.sampler.accept(token)
        text = self._stops.push(self._detokenizer.push(token))
        logprobs = [self._token_logprob(sample)] if sample.logprob is not None else None
        if self._stops.stopped:
            reason = FinishReason.STOP
        elif self.num_generated >= self.params.max_new_tokens or len(self) >= self.max_len:
            reason = FinishReason.LENGTH
        else:
            return TokenDelta(self.request_id, text, [token], logprobs=logprobs)
        last = self.finish(reason)
        return TokenDelta(self.request_id, text + last.text, [token], reason, last.usage, logprobs)

    def finish(self, reason: FinishReason) -> TokenDelta:
        """End the sequence; the final delta has the held-back text (none when aborted) and usage."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.sampler.close()
        text = ""
        if reason is not FinishReason.ABORT:
            text = self._stops.push(self._detokenizer.flush()) + self._stops.flush()
        cached = min(self.num_cached_prompt or 0, self.num_prompt_tokens)
        usage = Usage(self.num_prompt_tokens, self.num_generated, cached)
        return TokenDelta(self.request_id, text, [], reason, usage)

    def _token_logprob(self, sample: Sample) -> TokenLogprob:
        assert sample.logprob is not None
        top: dict[str, float] = {}
        for t, lp in sample.top:  # best first; tokens with the same text keep the likelier one
            top.setdefault(self._text(t), lp)
        return TokenLogprob(self._text(sample.token), sample.logprob, top)

    def _text(self, token: int) -> str:
        return self._vocab.piece(token).decode("utf-8", errors="replace")
