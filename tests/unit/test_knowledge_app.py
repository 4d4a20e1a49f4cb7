"""/v1/knowledge routes and `"langchain": true` answers over the fake engine and the real e5 embedder."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from easllm.config import KnowledgeConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.server.state import state_of
from tests.apps import serving
from tests.rag_samples import (
    DEEPSPEED_README,
    FACTS_JA,
    PDF_FACT_PAGE_2,
    encrypted_pdf_bytes,
    pdf_bytes,
    zip_bomb_docx,
)

TOKEN = "kb-token"
AUTH = {"Authorization": TOKEN}


@contextmanager
def start(engine: FakeEngine, data_dir: Path, **config: object) -> Iterator[TestClient]:
    defaults: dict[str, object] = {"token": TOKEN, "sampling": SamplingDefaults(max_new_tokens=8)}
    with serving(ServerConfig(data_dir=data_dir, **{**defaults, **config}), engine) as client:  # type: ignore[arg-type]
        yield client


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=4096)


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    with start(engine, tmp_path, knowledge=KnowledgeConfig(max_file_mb=0.1)) as c:
        yield c


def upload(client: TestClient, *files: tuple[str, bytes], field: str = "files"):
    return client.post("/v1/knowledge/files", files=[(field, f) for f in files], headers=AUTH)


def names(client: TestClient) -> list[str]:
    r = client.get("/v1/knowledge/files", headers=AUTH)
    assert r.status_code == 200
    return [f["name"] for f in r.json()["files"]]


def chunks(body: bytes) -> list[dict]:
    parts = body.split(b"\0")
    assert parts[-1] == b""
    return [json.loads(p) for p in parts[:-1]]


# -- upload, list, query, delete -------------------------------------------------------------------


def test_upload_list_query_delete(client: TestClient) -> None:
    r = upload(
        client,
        ("README.md", DEEPSPEED_README.encode()),
        ("handbook.pdf", pdf_bytes([["Welcome"], [PDF_FACT_PAGE_2]])),
    )
    assert r.status_code == 200, r.text
    added = {f["name"]: f for f in r.json()["files"]}
    assert added["handbook.pdf"]["pages"] == 2 and added["handbook.pdf"]["type"] == "pdf"
    assert added["README.md"]["chunks"] >= 2 and added["README.md"]["size"] == len(DEEPSPEED_README)

    listing = client.get("/v1/knowledge/files", headers=AUTH).json()
    assert sorted(f["name"] for f in listing["files"]) == ["README.md", "handbook.pdf"]
    assert listing["embedding_model"] == "multilingual-e5-small"
    assert listing["chunks"] == sum(f["chunks"] for f in listing["files"])
    assert all(f["added_at"].endswith("+00:00") for f in listing["files"])

    r = client.post(
        "/v1/knowledge/query", json={"query": "How do I install deepspeed?", "top_k": 2}, headers=AUTH
    )
    results = r.json()["results"]
    assert r.status_code == 200 and len(results) == 2
    assert results[0]["source"] == "README.md" and "pip install deepspeed" in results[0]["content"]
    assert results[0]["heading"] == "DeepSpeed quick start > Installation"
    assert results[0]["score"] >= results[1]["score"]

    r = client.post("/v1/knowledge/query", json={"text": "warehouse door code"}, headers=AUTH)
    top = r.json()["results"][0]
    assert top["source"] == "handbook.pdf" and top["page"] == 2

    r = client.delete("/v1/knowledge/files/README.md", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"]["name"] == "README.md"
    assert names(client) == ["handbook.pdf"]
    r = client.post("/v1/knowledge/query", json={"query": "install deepspeed", "top_k": 5}, headers=AUTH)
    assert {h["source"] for h in r.json()["results"]} == {"handbook.pdf"}


def test_reupload_with_the_same_name_replaces(client: TestClient) -> None:
    upload(client, ("notes.txt", b"The password hint is blue whale."))
    upload(client, ("notes.txt", b"The meeting moved to Friday."))
    listing = client.get("/v1/knowledge/files", headers=AUTH).json()
    assert [f["name"] for f in listing["files"]] == ["notes.txt"] and listing["chunks"] == 1
    r = client.post("/v1/knowledge/query", json={"query": "password hint"}, headers=AUTH)
    assert [h["content"] for h in r.json()["results"]] == ["The meeting moved to Friday."]


def test_path_names_are_stored_under_a_safe_name(client: TestClient, tmp_path: Path) -> None:
    r = upload(client, ("../../../escape.txt", b"inside"), ("/etc/abs.md", b"# A\n\nabs"))
    assert r.status_code == 200
    assert names(client) == ["abs.md", "escape.txt"]
    assert not (tmp_path.parent / "escape.txt").exists()
    knowledge = state_of(client.app).knowledge
    assert knowledge.original("escape.txt") == b"inside" and knowledge.original("abs.md") == b"# A\n\nabs"


def test_a_bad_file_in_a_multi_file_upload_keeps_the_good_ones(client: TestClient) -> None:
    r = upload(
        client, ("good.txt", b"Good text."), ("bad.exe", b"MZ\x90\x00"), ("also.md", b"# Also\n\nfine")
    )
    assert r.status_code == 415
    body = r.json()
    assert "bad.exe" in body["error"]["message"] and body["error"]["param"] == "files"
    assert [f["name"] for f in body["files"]] == ["good.txt", "also.md"]
    assert body["errors"] == [{"name": "bad.exe", "code": 415, "message": body["error"]["message"]}]
    assert names(client) == ["also.md", "good.txt"]


def test_any_multipart_field_name_is_accepted(client: TestClient) -> None:
    assert upload(client, ("one.txt", b"one"), field="file").status_code == 200
    assert names(client) == ["one.txt"]


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("deck.pptx", b"PK\x03\x04", 415, "unsupported file type"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 415, "binary"),
        ("renamed.pdf", b"just text", 415, "not a PDF"),
        ("renamed.docx", b"just text", 415, "not a DOCX"),
        ("empty.txt", b"", 400, "is empty"),
        ("broken.pdf", b"%PDF-1.7\ngarbage", 400, "corrupt"),
        ("locked.pdf", encrypted_pdf_bytes([["secret"]]), 400, "password-protected"),
        ("bomb.docx", zip_bomb_docx(), 400, "zip bomb"),
        ("big.txt", b"word " * 40_000, 413, "limit is 0.1 MB"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "",
)
def test_bad_files_get_a_clear_4xx_and_nothing_is_indexed(
    client: TestClient, name: str, data: bytes, status: int, words: str
) -> None:
    r = upload(client, (name, data))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert name in error["message"] and words in error["message"] and error["param"] == "files"
    assert r.json()["files"] == []
    assert names(client) == []


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"json": {"query": "x"}}, 400, "files"),  # not multipart
        ({"files": {"note": (None, "just a field")}}, 400, "files"),  # multipart without files
    ],
)
def test_uploads_without_files_are_400(client: TestClient, kwargs: dict, status: int, param: str) -> None:
    r = client.post("/v1/knowledge/files", headers=AUTH, **kwargs)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_a_huge_declared_upload_is_413_before_parsing(client: TestClient) -> None:
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**9)}
    r = client.post("/v1/knowledge/files", headers=headers, content=b"--x--")
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"query": "x"', "body"),
        (b'["x"]', "body"),
        (b"{}", "query"),
        (b'{"query": 5}', "query"),
        (b'{"query": "   "}', "query"),
        (b'{"query": "x", "top_k": 0}', "top_k"),
        (b'{"query": "x", "top_k": 1000}', "top_k"),
        (b'{"query": "x", "score_threshold": 2}', "score_threshold"),
    ],
)
def test_bad_queries_are_400_naming_the_field(client: TestClient, body: bytes, param: str) -> None:
    r = client.post("/v1/knowledge/query", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_query_on_an_empty_base_returns_nothing(client: TestClient) -> None:
    r = client.post("/v1/knowledge/query", json={"query": "anything"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["results"] == []


def test_score_threshold_filters_weak_chunks(client: TestClient) -> None:
    upload(client, ("a.txt", b"Bananas are yellow fruit."))
    r = client.post("/v1/knowledge/query", json={"query": "bananas", "score_threshold": 0.99}, headers=AUTH)
    assert r.json()["results"] == []


def test_deleting_an_unknown_file_is_404(client: TestClient) -> None:
    r = client.delete("/v1/knowledge/files/nothing.txt", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/v1/knowledge/files"), ("post", "/v1/knowledge/query"), ("delete", "/v1/knowledge/files/a")],
)
def test_knowledge_routes_need_the_token(client: TestClient, method: str, path: str) -> None:
    assert getattr(client, method)(path, headers={"Authorization": "wrong"}).status_code == 401
    assert upload_without_token(client).status_code == 401


def upload_without_token(client: TestClient):
    return client.post("/v1/knowledge/files", files=[("files", ("a.txt", b"x"))])


def test_the_knowledge_base_survives_a_restart(engine: FakeEngine, tmp_path: Path) -> None:
    with start(engine, tmp_path) as c:
        upload(c, ("忘年会.txt", FACTS_JA.encode()))
    with start(FakeEngine(context_length=4096), tmp_path) as c:
        assert names(c) == ["忘年会.txt"]
        r = c.post("/v1/knowledge/query", json={"query": "忘年会の会費はいくらですか"}, headers=AUTH)
        assert r.json()["results"][0]["source"] == "忘年会.txt"


# -- "langchain": true ------------------------------------------------------------------------------


def prompt_text(engine: FakeEngine) -> str:
    return engine.detokenize(engine.requests[-1].prompt_token_ids)


def test_langchain_on_an_empty_base_is_400(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/", json={"prompt": "How do I install deepspeed?", "langchain": True}, headers=AUTH)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "langchain" and "empty" in error["message"]
    assert engine.requests == []


def test_langchain_answer_is_grounded_and_carries_sources(client: TestClient, engine: FakeEngine) -> None:
    upload(client, ("README.md", DEEPSPEED_README.encode()), ("other.txt", b"Cats sleep most of the day."))
    body = {"prompt": "How do I install deepspeed? [eos]", "langchain": True, "history": [["hi", "hello"]]}
    r = client.post("/", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    data = r.json()
    sources = data["sources"]
    assert sources[0]["source"] == "README.md" and "pip install deepspeed" in sources[0]["content"]
    assert set(sources[0]) == {"source", "content", "score", "page", "heading"}
    assert len(sources) == 3  # --kb-top-k default
    prompt = prompt_text(engine)
    system = prompt.index("<|im_start|>system\nAnswer the question using only the numbered excerpts")
    excerpt = prompt.index("[1] (README.md, DeepSpeed quick start > Installation)")
    history = prompt.index("<|im_start|>user\nhi<|im_end|>")  # history kept, ungrounded
    question = prompt.index("<|im_start|>user\nHow do I install deepspeed? [eos]<|im_end|>")  # as asked
    assert system < excerpt < history < question
    assert "Question:" not in prompt
    assert data["history"][-1][0] == "How do I install deepspeed? [eos]"  # the user's words, not the prompt


def test_langchain_streaming_puts_sources_in_the_final_chunk(client: TestClient) -> None:
    upload(client, ("README.md", DEEPSPEED_README.encode()))
    body = {"prompt": "How do I install deepspeed?", "langchain": True, "use_stream_chat": True}
    r = client.post("/", json=body, headers=AUTH)
    parts = chunks(r.content)
    assert len(parts) > 2
    assert all("sources" not in p for p in parts[:-1])
    assert parts[-1]["sources"][0]["source"] == "README.md" and parts[-1]["finish_reason"] == "length"


def test_without_langchain_nothing_is_retrieved(client: TestClient, engine: FakeEngine) -> None:
    upload(client, ("README.md", DEEPSPEED_README.encode()))
    data = client.post("/", json={"prompt": "install? [eos]"}, headers=AUTH).json()
    assert "sources" not in data and "Excerpts" not in prompt_text(engine)


def test_excerpts_are_dropped_lowest_score_first_to_fit_the_context(tmp_path: Path) -> None:
    engine = FakeEngine(context_length=700)  # the fake tokenizer: one token per character
    with start(engine, tmp_path, knowledge=KnowledgeConfig(chunk_size=150, chunk_overlap=0, top_k=4)) as c:
        upload(c, ("README.md", DEEPSPEED_README.encode()))
        r = c.post("/", json={"prompt": "How do I install deepspeed?", "langchain": True}, headers=AUTH)
        assert r.status_code == 200, r.text
        sources = r.json()["sources"]
        all_hits = c.post(
            "/v1/knowledge/query", json={"query": "How do I install deepspeed?", "top_k": 4}, headers=AUTH
        ).json()["results"]
        used = [any(h["content"] in s["content"] for s in sources) for h in all_hits]  # neighbours merged
        assert any(used) and not all(used)
        assert used == sorted(used, reverse=True)  # the best-ranked kept, the rest dropped
        assert len(engine.requests[-1].prompt_token_ids) + 8 <= 700


def test_a_context_too_small_for_one_excerpt_is_400(tmp_path: Path) -> None:
    engine = FakeEngine(context_length=300)
    with start(engine, tmp_path, knowledge=KnowledgeConfig(chunk_size=200, chunk_overlap=0)) as c:
        upload(c, ("README.md", DEEPSPEED_README.encode()))
        r = c.post("/", json={"prompt": "How do I install deepspeed?", "langchain": True}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert engine.requests == []


def test_a_model_without_a_chat_template_gets_a_plain_text_layout(tmp_path: Path) -> None:
    engine = FakeEngine(context_length=4096, chat_template=None)
    with start(engine, tmp_path) as c:
        upload(c, ("README.md", DEEPSPEED_README.encode()))
        body = {"prompt": "How do I install deepspeed?", "langchain": True, "system_prompt": "Be brief."}
        r = c.post("/", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["sources"][0]["source"] == "README.md"
        prompt = prompt_text(engine)
        assert prompt.startswith("Be brief.\n\nAnswer the question using only")
        assert prompt.endswith("Question: How do I install deepspeed?\n\nAnswer:")
        assert "<|im_start|>" not in prompt


def test_nothing_above_the_threshold_tells_the_model_so(tmp_path: Path) -> None:
    engine = FakeEngine(context_length=4096)
    with start(engine, tmp_path, knowledge=KnowledgeConfig(score_threshold=0.99)) as c:
        upload(c, ("README.md", DEEPSPEED_README.encode()))
        r = c.post("/", json={"prompt": "What is the capital of Peru?", "langchain": True}, headers=AUTH)
        assert r.status_code == 200 and r.json()["sources"] == []
        assert "No excerpt of the knowledge base matches the question" in prompt_text(engine)
