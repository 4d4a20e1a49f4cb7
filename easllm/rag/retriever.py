"""Hybrid retrieval: the vector ranking and the BM25 ranking, fused by reciprocal rank; context merging.

Reciprocal-rank fusion (Cormack et al., 2009) scores a chunk by sum(1 / (RRF_K + rank)) over the
rankings that hold it: it needs no calibration between cosine and BM25 scales, and a chunk that
either ranking puts near the top survives. The fused score is reported on [0, 1] (1.0: first in
every ranking). `score_threshold` stays a floor on cosine similarity, for keyword hits too, so
that it means the same in every mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from easllm.rag.store import Hit, VectorStore

MODES = ("hybrid", "vector", "keyword")
RRF_K = 60  # the constant of the paper; smaller lets the first ranks dominate more
# The chunks of each ranking that are fused; deeper ones only fill a larger top_k after them.
# Measured on bench/knowledge_questions.json: 3-5 keep hit@3 at 30/30, 8 drops it to 28, 12-30 to 27
# (chunks middling in both rankings then outrank one ranking's clear first).
CANDIDATES = 5
MIN_SEAM = 5  # shorter shared text at a seam is taken for chance, not the splitter's overlap


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(chunk id, fused score on [0, 1]), best first; ties keep the first ranking's order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (k + rank)
    best = len(rankings) / (k + 1) if rankings else 1.0
    return sorted(((i, s / best) for i, s in scores.items()), key=lambda pair: -pair[1])


def retrieve(
    store: VectorStore,
    query: str,
    vector: np.ndarray,
    top_k: int,
    min_score: float,
    mode: str = "hybrid",
    candidates: int = CANDIDATES,
) -> list[Hit]:
    """Up to top_k chunks for `query` (whose embedding is `vector`), best first."""
    if mode not in MODES:
        raise ValueError(f"retrieval mode {mode!r}: choose one of {', '.join(MODES)}")
    pool = max(top_k, candidates, 2 * top_k)
    by_vector = store.search(vector, pool) if mode != "keyword" else []
    if mode == "vector":
        return [hit for hit in by_vector if hit.score >= min_score][:top_k]
    by_keyword = store.keyword_search(query, pool)
    chunks = {_store_id(hit): hit.chunk for hit in [*by_keyword, *by_vector]}
    cosine = {_store_id(hit): hit.score for hit in by_vector}
    missing = [i for i in map(_store_id, by_keyword) if i not in cosine]
    if missing:
        cosine.update(zip(missing, store.similarities(vector, missing), strict=True))
    rankings = [[_store_id(h) for h in ranking] for ranking in (by_vector, by_keyword) if ranking]
    head = reciprocal_rank_fusion([r[:candidates] for r in rankings])
    seen = {i for i, _ in head}
    floor = head[-1][1] if head else 1.0
    tail = [(i, min(s, floor)) for i, s in reciprocal_rank_fusion(rankings) if i not in seen]  # large top_k
    return [Hit(chunks[i], score, i) for i, score in [*head, *tail] if cosine[i] >= min_score][:top_k]


def _store_id(hit: Hit) -> int:
    """A store's hits carry their chunk id (only merged or hand-made hits may lack one)."""
    if hit.id is None:
        raise ValueError(f"the store returned a hit of {hit.chunk.source} without its chunk id")
    return hit.id


def merge_adjacent(hits: Sequence[Hit], overlap: int) -> list[Hit]:
    """Hits of neighbouring chunks of one section (file, page and heading) become one excerpt, in
    document order, at the rank of the best of them; the `overlap` characters the splitter repeated
    are given once."""
    groups: list[list[Hit]] = []
    for hit in hits:
        homes = [g for g in groups if _adjacent(g, hit)]
        if not homes:
            groups.append([hit])
            continue
        home = homes[0]
        home.append(hit)
        for other in homes[1:]:  # the hit bridges two groups: 5 and 7, then 6
            home.extend(other)
            groups.remove(other)
        home.sort(key=lambda h: h.id if h.id is not None else -1)
    merged = []
    for group in groups:
        first = group[0]
        text = first.chunk.content
        for hit in group[1:]:
            text = _join(text, hit.chunk.content, overlap)
        best = max(h.score for h in group)
        merged.append(Hit(replace(first.chunk, content=text), best, first.id))
    return merged


def _adjacent(group: list[Hit], hit: Hit) -> bool:
    if hit.id is None:
        return False
    return any(h.id is not None and abs(h.id - hit.id) == 1 and _section(h) == _section(hit) for h in group)


def _section(hit: Hit) -> tuple[str, int | None, str | None]:
    return hit.chunk.source, hit.chunk.page, hit.chunk.heading


def _join(left: str, right: str, overlap: int) -> str:
    """`left` then `right` without the text they share at the seam (up to `overlap` characters)."""
    for size in range(min(overlap, len(left), len(right)), MIN_SEAM - 1, -1):
        if left.endswith(right[:size]):
            return left + right[size:]
    return f"{left}\n{right}"
