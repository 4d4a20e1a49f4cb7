"""KeywordIndex: CJK bigrams and Latin words, BM25 ranking, incremental add/remove, FaissStore's hook."""

import time
from pathlib import Path

import numpy as np

from easllm.rag.keyword import KeywordIndex, tokenize
from easllm.rag.splitter import Chunk
from easllm.rag.store import FaissStore, StoredFile


def test_japanese_and_chinese_become_character_bigrams() -> None:
    assert tokenize("デプロイ時間") == ["デプ", "プロ", "ロイ", "イ時", "時間"]
    assert tokenize("公司旅行") == ["公司", "司旅", "旅行"]
    assert tokenize("猫") == ["猫"]  # a lone character stays a unigram


def test_latin_words_are_lowercased_and_full_width_is_normalised() -> None:
    assert tokenize("Install DeepSpeed, pip-install") == ["install", "deepspeed", "pip", "install"]
    assert tokenize("ＥＡＳの５分") == ["eas", "の", "5", "分"]
    assert tokenize("EASでLLMを") == ["eas", "で", "llm", "を"]


def test_the_chunk_holding_the_rare_term_ranks_first() -> None:
    index = KeywordIndex(
        [
            (1, "デプロイには約5分かかります。"),
            (2, "WebUIでモデルを呼び出します。"),
            (3, "The Zorblatt reactor runs on lemon juice."),
            (4, "The office runs on coffee."),
        ]
    )
    assert index.search("モデルのデプロイにかかる時間", 4)[0][0] == 1
    assert index.search("What does the Zorblatt reactor run on?", 4)[0][0] == 3
    scores = [s for _, s in index.search("runs on lemon", 4)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 2  # chunks 3 and 4 share terms


def test_chunks_sharing_no_term_are_not_returned() -> None:
    index = KeywordIndex([(1, "apples and pears"), (2, "猫が好き")])
    assert index.search("bananas", 5) == []
    assert index.search("犬", 5) == []
    assert index.search("", 5) == [] and KeywordIndex().search("apples", 5) == []


def test_add_and_remove_are_incremental() -> None:
    index = KeywordIndex([(1, "alpha beta"), (2, "beta gamma")])
    index.add([(3, "gamma delta")])
    assert {i for i, _ in index.search("gamma", 5)} == {2, 3}
    index.remove([2])
    assert [i for i, _ in index.search("gamma", 5)] == [3]
    assert index.search("beta", 5)[0][0] == 1
    index.add([(1, "omega")])  # an id added again is replaced
    assert index.search("alpha", 5) == [] and index.search("omega", 5)[0][0] == 1
    index.remove([1, 3, 99])  # unknown ids are ignored
    assert len(index) == 0 and index.search("omega", 5) == []
    index.add([(7, "omega")])  # a freed slot is reused
    assert index.search("omega", 5) == [(7, index.search("omega", 5)[0][1])]


def test_k_limits_and_orders_the_result() -> None:
    index = KeywordIndex((i, "word " * (i + 1)) for i in range(20))
    top = index.search("word", 3)
    assert len(top) == 3 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)


def test_a_huge_query_is_cut_and_answers_fast() -> None:
    index = KeywordIndex((i, f"document {i} about topic {i % 7}") for i in range(200))
    start = time.perf_counter()
    assert index.search("topic " * 1_000_000, 5)
    assert time.perf_counter() - start < 2


def test_faiss_store_answers_keyword_queries_and_keeps_them_across_reloads(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    chunks = [Chunk("a.txt", "モデルの展開には約5分かかります。"), Chunk("a.txt", "WebUIを使用した推論")]
    vectors = np.eye(2, 4, dtype=np.float32)
    store.put_file(StoredFile("a.txt", "txt", 1, 2, None, 0.0, "x"), chunks, vectors, "e")
    hit = store.keyword_search("展開の時間", 2)[0]
    assert hit.chunk == chunks[0] and hit.id == 0 and hit.score > 0
    reopened = FaissStore(tmp_path)
    assert reopened.keyword_search("推論", 1)[0].chunk == chunks[1]
    assert reopened.similarities(np.eye(1, 4, 1, dtype=np.float32)[0], [1, 0]) == [1.0, 0.0]
    reopened.remove_file("a.txt")
    assert reopened.keyword_search("推論", 1) == []
