"""Per-sequence sampling over one row of logits: penalties, grammar, temperature, top-k, top-p, seed.

Order: penalties -> grammar -> temperature -> top-k -> top-p -> draw. The sampler depends only on
the logits it is given and on its own state (its seed, the tokens it has accepted), so a
sequence samples the same tokens alone or in a batch.

Penalty semantics follow vLLM: `repetition_penalty` (CTRL/HF: positive logits divided, negative
multiplied) applies to every token of the prompt and the answer so far; `presence_penalty` and
`frequency_penalty` (OpenAI: minus once / minus per occurrence) apply to the answer's tokens only.
Log-probabilities are those of the model (raw logits, before penalties, temperature and grammar).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from easllm.engine.types import SamplingParams

NO_TOKEN = -1  # the grammar allows no token at all: the sequence ends


class Grammar(Protocol):
    """A grammar constraint with state: which tokens may come next."""

    def allows(self, token: int) -> bool: ...

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with the tokens the grammar forbids now set to -inf."""
        ...

    def accept(self, token: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None = None  # set when the request asked for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), best first


class Sampler:
    def __init__(
        self, params: SamplingParams, prompt_ids: Iterable[int] = (), grammar: Grammar | None = None
    ) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.default_rng(self.seed)
        self._grammar = grammar
        self._seen = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        self._seen_array: np.ndarray | None = None
        self._counts: Counter[int] = Counter()
        self._counts_arrays: tuple[np.ndarray, np.ndarray] | None = None

    def sample(self, logits: np.ndarray) -> Sample:
        """Choose the next token from one row of logits (not modified)."""
        scores = self._penalized(logits)
        token = self._choose(scores)
        if self._grammar is not None and not self._grammar.allows(token):
            # Checking the one sampled token is cheap; masking the whole vocabulary is not.
            scores = self._grammar.mask(scores)
            token = self._choose(scores) if np.isfinite(scores).any() else NO_TOKEN
        if self.params.logprobs is None or token == NO_TOKEN:
            return Sample(token)
        return self._with_logprobs(logits, token, self.params.logprobs)

    def accept(self, token: int) -> None:
        """The token was appended to the sequence: update penalties and grammar state."""
        if self.params.repetition_penalty != 1.0 and token not in self._seen:
            self._seen.add(token)
            self._seen_array = None
        if self.params.presence_penalty or self.params.frequency_penalty:
            self._counts[token] += 1
            self._counts_arrays = None
        if self._grammar is not None:
            self._grammar.accept(token)

    def close(self) -> None:
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None

    # -- the steps --
    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        if p.repetition_penalty == 1.0 and not self._counts:
            return logits
        scores = np.array(logits, dtype=np.float32, copy=True)
        if p.repetition_penalty != 1.0 and self._seen:
            if self._seen_array is None:
                self._seen_array = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            ids = self._seen_array
            seen = scores[ids]
            scores[ids] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if self._counts:
            if self._counts_arrays is None:
                ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
                counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
                self._counts_arrays = (ids, counts)
            ids, counts = self._counts_arrays
            scores[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return scores

    def _choose(self, scores: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(scores))
        ids = None  # None: the whole vocabulary, in id order
        values = scores
        if 0 < p.top_k < len(scores):
            ids = np.argpartition(-scores, p.top_k - 1)[: p.top_k]
            values = scores[ids]
        probs = _softmax(values.astype(np.float64) / p.temperature)
        if p.top_p < 1.0:
            keep = _nucleus(probs, p.top_p)
            ids = keep if ids is None else ids[keep]
            probs = probs[keep]
        cumulative = np.cumsum(probs)
        pick = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        pick = min(pick, len(probs) - 1)
        return int(pick if ids is None else ids[pick])

    def _with_logprobs(self, logits: np.ndarray, token: int, n: int) -> Sample:
        row = logits.astype(np.float64)
        peak = row.max()
        log_total = peak + np.log(np.exp(row - peak).sum())
        top: list[tuple[int, float]] = []
        if n > 0:
            n = min(n, len(row))
            best = np.argpartition(-row, n - 1)[:n]
            best = best[np.argsort(-row[best], kind="stable")]
            top = [(int(t), float(row[t] - log_total)) for t in best]
        return Sample(token, float(row[token] - log_total), top)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    probs: np.ndarray = e / e.sum()
    return probs


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most likely entries whose probabilities reach `top_p`,
    most likely first. Sorts only a growing head of the distribution, not the whole vocabulary."""
    n = len(probs)
    k = min(64, n)
    while True:
        head = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        head = head[np.argsort(-probs[head], kind="stable")]
        cumulative = np.cumsum(probs[head])
        if cumulative[-1] >= top_p or k == n:
            cut = int(np.searchsorted(cumulative, top_p, side="left"))
            return head[: min(cut, k - 1) + 1]
        k = min(n, k * 4)
