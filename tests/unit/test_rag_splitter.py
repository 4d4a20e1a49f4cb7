"""The splitter cuts CJK text at sentence punctuation, Latin text at sentences, within the size."""

import itertools

import pytest

from easllm.rag.loaders import Document, Section
from easllm.rag.splitter import Chunk, Splitter

JAPANESE = (
    "東京は日本の首都です。人口は約千四百万人で、世界有数の大都市です。"
    "富士山は日本で一番高い山で、標高は三七七六メートルです。"
    "京都には千年以上の歴史があり、多くの寺や神社があります！"
    "大阪は食べ物がおいしい町として知られています。"
) * 3
CHINESE = "北京是中国的首都，也是历史悠久的城市。长城是世界著名的建筑？上海是中国最大的城市之一。" * 4


@pytest.mark.parametrize("text", [JAPANESE, CHINESE], ids=["ja", "zh"])
def test_cjk_text_splits_at_sentence_ends_within_the_size(text: str) -> None:
    chunks = Splitter(chunk_size=80, chunk_overlap=0).split_text(text)
    assert len(chunks) > 2
    assert all(len(c) <= 80 for c in chunks)
    assert all(c[-1] in "。！？" for c in chunks), chunks
    assert "".join(chunks) == text  # no overlap: nothing lost, nothing repeated


def test_overlap_repeats_the_end_of_the_previous_chunk() -> None:
    chunks = Splitter(chunk_size=60, chunk_overlap=30).split_text(JAPANESE)
    pairs = list(itertools.pairwise(chunks))
    assert any(b[:8] in a for a, b in pairs), chunks


def test_english_splits_at_sentences_not_mid_word() -> None:
    text = " ".join(f"Sentence number {i} says something useful." for i in range(30))
    chunks = Splitter(chunk_size=120, chunk_overlap=0).split_text(text)
    assert all(len(c) <= 120 for c in chunks)
    assert all(c.endswith(".") and c.startswith("Sentence") for c in chunks)


def test_chunks_keep_source_page_and_heading() -> None:
    doc = Document(
        "m.pdf",
        "pdf",
        [Section("Page one. " * 20, page=1), Section("Page two text.", page=2, heading="Intro")],
        pages=2,
    )
    chunks = Splitter(chunk_size=60, chunk_overlap=0).split(doc)
    assert {c.page for c in chunks} == {1, 2}
    assert chunks[-1] == Chunk("m.pdf", "Page two text.", 2, "Intro")
    assert all(c.source == "m.pdf" for c in chunks)


def test_the_embedded_text_carries_the_heading_path() -> None:
    assert Chunk("a.docx", "Run the tests.", heading="Setup > Tests").embedding_text() == (
        "Setup > Tests\nRun the tests."
    )
    assert Chunk("a.md", "# Setup\nRun.", heading="Setup").embedding_text() == "# Setup\nRun."


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (100, 100), (100, -1)])
def test_bad_settings_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        Splitter(size, overlap)
