"""BM25 keyword search over the chunks, beside the vectors: exact terms that embeddings miss.

Japanese and Chinese have no spaces between words, so text is cut the way Lucene's CJK analyser
cuts it: runs of Han, kana and Hangul become overlapping character bigrams (a lone character
stays a unigram), everything else becomes lowercase words; NFKC first, so full-width `ＥＡＳ５`
matches `eas5`. No dictionary, no language detection, one tokenizer for mixed text.

`KeywordIndex` is an in-memory inverted index built from (chunk id, text) pairs — a cache of the
stored chunk rows, as FAISS is a cache of the vectors — that adds and removes chunks
incrementally and scores a query with Okapi BM25 in numpy over the query terms' postings only.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable

import numpy as np

K1 = 1.2  # term-frequency saturation
B = 0.75  # length normalisation
MAX_QUERY_CHARS = 2000  # a pasted page as a query: its start is enough to rank by

_CJK = (
    r"\u3040-\u30ff"  # hiragana, katakana (with ー)
    r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
    r"\uac00-\ud7af\u1100-\u11ff"  # Hangul
)
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]")


def tokenize(text: str) -> list[str]:
    """'EASのデプロイ時間' -> ['eas', 'デプ', 'プロ', 'ロイ', 'イ時', '時間'] (the の run boundary aside)."""
    normal = unicodedata.normalize("NFKC", text).casefold()
    tokens: list[str] = []
    for run in _TOKEN.findall(normal):
        if not _CJK_RUN.match(run):
            tokens.append(run.strip("_"))
        elif len(run) == 1:
            tokens.append(run)
        else:
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
    return [t for t in tokens if t]


class KeywordIndex:
    """Chunk ids -> BM25 scores for a query; safe to query while another thread adds or removes."""

    def __init__(self, items: Iterable[tuple[int, str]] = ()) -> None:
        self._lock = threading.Lock()
        self._postings: dict[str, dict[int, int]] = {}  # term -> {slot: term frequency}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # term -> (slots, tfs), cached
        self._terms: dict[int, list[str]] = {}  # chunk id -> its distinct terms, for removal
        self._slot: dict[int, int] = {}  # chunk id -> row of _lengths
        self._ids: list[int] = []  # slot -> chunk id (-1: free)
        self._free: list[int] = []
        self._lengths = np.zeros(0, dtype=np.float32)
        self._total_length = 0
        self.add(items)

    def __len__(self) -> int:
        return len(self._slot)

    def add(self, items: Iterable[tuple[int, str]]) -> None:
        """Index (chunk id, text) pairs; an id already indexed is replaced."""
        tokenized = [(chunk_id, Counter(tokenize(text))) for chunk_id, text in items]
        with self._lock:
            for chunk_id, counts in tokenized:
                if chunk_id in self._slot:
                    self._remove_one(chunk_id)
                slot = self._take_slot(chunk_id)
                length = sum(counts.values())
                self._lengths[slot] = length
                self._total_length += length
                self._terms[chunk_id] = list(counts)
                for term, tf in counts.items():
                    self._postings.setdefault(term, {})[slot] = tf
                    self._arrays.pop(term, None)

    def remove(self, chunk_ids: Iterable[int]) -> None:
        with self._lock:
            for chunk_id in chunk_ids:
                if chunk_id in self._slot:
                    self._remove_one(chunk_id)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to k (chunk id, BM25 score) pairs, best first; chunks sharing no term are left out."""
        terms = list(dict.fromkeys(tokenize(query[:MAX_QUERY_CHARS])))
        with self._lock:
            n = len(self._slot)
            if not n or not terms or k < 1:
                return []
            average = self._total_length / n or 1.0
            scores = np.zeros(len(self._ids), dtype=np.float32)
            norm = K1 * (1 - B + B * self._lengths / average)
            for term in terms:
                postings = self._postings.get(term)
                if not postings:
                    continue
                slots, tfs = self._term_arrays(term, postings)
                idf = math.log(1 + (n - len(slots) + 0.5) / (len(slots) + 0.5))
                scores[slots] += idf * tfs * (K1 + 1) / (tfs + norm[slots])
            found = np.flatnonzero(scores > 0)
            if len(found) > k:
                found = found[np.argpartition(-scores[found], k - 1)[:k]]
            best = found[np.argsort(-scores[found], kind="stable")]
            return [(self._ids[slot], float(scores[slot])) for slot in best]

    # -- internals (under the lock) ------------------------------------------------------------

    def _term_arrays(self, term: str, postings: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(term)
        if arrays is None:
            slots = np.fromiter(postings.keys(), dtype=np.int64, count=len(postings))
            tfs = np.fromiter(postings.values(), dtype=np.float32, count=len(postings))
            arrays = self._arrays[term] = (slots, tfs)
        return arrays

    def _take_slot(self, chunk_id: int) -> int:
        if self._free:
            slot = self._free.pop()
            self._ids[slot] = chunk_id
        else:
            slot = len(self._ids)
            self._ids.append(chunk_id)
            if slot >= len(self._lengths):
                grown = np.zeros(max(64, 2 * len(self._lengths)), dtype=np.float32)
                grown[: len(self._lengths)] = self._lengths
                self._lengths = grown
        self._slot[chunk_id] = slot
        return slot

    def _remove_one(self, chunk_id: int) -> None:
        slot = self._slot.pop(chunk_id)
        for term in self._terms.pop(chunk_id):
            postings = self._postings[term]
            del postings[slot]
            if not postings:
                del self._postings[term]
            self._arrays.pop(term, None)
        self._total_length -= int(self._lengths[slot])
        self._lengths[slot] = 0
        self._ids[slot] = -1
        self._free.append(slot)
