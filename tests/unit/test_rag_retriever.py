"""Reciprocal-rank fusion, hybrid retrieval over a real FaissStore, and merging adjacent chunks."""

from pathlib import Path

import numpy as np
import pytest

from easllm.rag.retriever import merge_adjacent, reciprocal_rank_fusion, retrieve
from easllm.rag.splitter import Chunk
from easllm.rag.store import FaissStore, Hit, StoredFile


def test_fusion_rewards_agreement_and_keeps_either_rankings_top() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 4, 1]], k=60)
    ids = [i for i, _ in fused]
    assert ids[:2] == [1, 3]  # in both rankings
    assert set(ids) == {1, 2, 3, 4}
    assert fused[0][1] == pytest.approx((1 / 61 + 1 / 63) / (2 / 61))


def test_fusion_scores_one_for_first_everywhere_and_ties_keep_the_first_ranking() -> None:
    assert reciprocal_rank_fusion([[7, 8], [7, 9]])[0] == (7, pytest.approx(1.0))
    assert [i for i, _ in reciprocal_rank_fusion([[5, 6], [6, 5]])] == [5, 6]
    assert reciprocal_rank_fusion([]) == []


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def store(tmp_path: Path) -> FaissStore:
    """Chunk 2 holds the exact term (Q-7731) but its vector points away from the query's."""
    store = FaissStore(tmp_path)
    texts = ["Parking is behind the building.", "Visitors sign in at reception.", "Badge code Q-7731."]
    chunks = [Chunk("office.txt", t) for t in texts]
    vectors = np.stack([unit(1, 0.1, 0), unit(1, 0.3, 0), unit(0, 0.2, 1)])
    store.put_file(StoredFile("office.txt", "txt", 1, 3, None, 0.0, "x"), chunks, vectors, "e")
    return store


def test_hybrid_finds_the_exact_term_that_vectors_rank_last(store: FaissStore) -> None:
    query, vector = "What is badge code Q-7731 for?", unit(1, 0.2, 0)
    by_vector = retrieve(store, query, vector, 3, -1.0, "vector")
    assert "Q-7731" in by_vector[-1].chunk.content
    hybrid = retrieve(store, query, vector, 3, -1.0, "hybrid")
    assert "Q-7731" in hybrid[0].chunk.content
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    assert all(0 < h.score <= 1 for h in hybrid)


def test_the_threshold_is_on_cosine_for_keyword_hits_too(store: FaissStore) -> None:
    query, vector = "badge code Q-7731", unit(1, 0.2, 0)
    kept = retrieve(store, query, vector, 3, 0.5, "hybrid")
    assert kept and all("Q-7731" not in h.chunk.content for h in kept)  # its cosine is ~0.04
    assert retrieve(store, query, vector, 3, 0.999, "keyword") == []


def test_an_unknown_mode_is_refused(store: FaissStore) -> None:
    with pytest.raises(ValueError, match="retrieval mode"):
        retrieve(store, "x", unit(1, 0, 0), 3, 0.0, "magic")


def hit(i: int, content: str, score: float, heading: str | None = None, source: str = "a.md") -> Hit:
    return Hit(Chunk(source, content, None, heading), score, i)


def test_adjacent_chunks_of_a_section_merge_in_document_order_without_the_overlap() -> None:
    hits = [
        hit(5, "the second part of the page.", 0.9),
        hit(9, "far away", 0.8),
        hit(4, "The first part, then the second part", 0.7),
    ]
    merged = merge_adjacent(hits, overlap=20)
    first = "The first part, then the second part of the page."
    assert [h.chunk.content for h in merged] == [first, "far away"]
    assert merged[0].score == 0.9 and merged[0].id == 4


def test_a_chunk_between_two_hits_joins_both() -> None:
    merged = merge_adjacent([hit(1, "one", 0.9), hit(3, "three", 0.8), hit(2, "two", 0.7)], overlap=0)
    assert [h.chunk.content for h in merged] == ["one\ntwo\nthree"]


def test_neighbours_of_other_sections_or_files_stay_apart() -> None:
    hits = [hit(1, "a", 0.9, "Setup"), hit(2, "b", 0.8, "Usage"), hit(3, "c", 0.7, "Usage", source="b.md")]
    assert len(merge_adjacent(hits, overlap=10)) == 3
    assert merge_adjacent([Hit(Chunk("a.md", "x"), 0.5)], overlap=10)[0].chunk.content == "x"
