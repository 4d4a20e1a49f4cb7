"""Upload and ask with the bundled Qwen chat model: answers grounded on the files, with sources."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.rag_samples import (
    DEEPSPEED_README,
    DOCX_FACT,
    FACTS_JA,
    FACTS_MD,
    FACTS_TXT,
    FACTS_ZH,
    PDF_FACT_PAGE_2,
    docx_bytes,
    pdf_bytes,
)
from tests.servers import Server, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (file, bytes, question, words of which the answer should hold one)
FACTS = [
    ("reactor.txt", FACTS_TXT.encode(), "What does the Zorblatt reactor run on?", ["lemon"]),
    ("office.md", FACTS_MD.encode(), "Where do visitors park in the office?", ["Q17", "minus three", "-3"]),
    ("忘年会.txt", FACTS_JA.encode(), "忘年会の会費はいくらですか？", ["五千", "5000", "5,000", "5千"]),
    ("旅行.txt", FACTS_ZH.encode(), "公司年度旅行去哪里？", ["桂林"]),
    (
        "generator.docx",
        docx_bytes("Maintenance", ["Weekly checks.", DOCX_FACT]),
        "When is the emergency generator tested?",
        ["Tuesday", "06:30", "6:30"],
    ),
    (
        "warehouse.pdf",
        pdf_bytes([["Warehouse handbook", "Opening hours are 8 to 5."], [PDF_FACT_PAGE_2]]),
        "What is the warehouse door code?",
        ["7351"],
    ),
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("qwen-kb")
    args = ["--max-new-tokens", "96", "--threads", "2", "--data-dir", str(tmp / "data"), "--temperature", "0"]
    with running_server(args, tmp) as server:
        yield server


def ask(server: Server, question: str, **extra: object) -> requests.Response:
    body = {"prompt": question, "langchain": True, "temperature": 0, **extra}
    return requests.post(server.url, json=body, headers=server.headers(), timeout=300)


def test_install_deepspeed_is_answered_from_the_uploaded_readme(qwen: Server) -> None:
    files = {"files": ("deepspeed-README.md", DEEPSPEED_README.encode())}
    r = requests.post(f"{qwen.url}/v1/knowledge/files", files=files, headers=qwen.headers(), timeout=120)
    assert r.status_code == 200, r.text

    data = ask(qwen, "How do I install deepspeed?").json()
    assert data["sources"][0]["source"] == "deepspeed-README.md", data
    assert "pip install deepspeed" in data["sources"][0]["content"]
    assert "pip install deepspeed" in data["response"], data["response"]

    r = ask(qwen, "How do I install deepspeed?", use_stream_chat=True)
    chunks = [json.loads(p) for p in r.content.split(b"\0") if p]
    assert chunks[-1]["sources"][0]["source"] == "deepspeed-README.md"
    assert chunks[-1]["response"] == data["response"]  # greedy: the same answer streamed


def test_fact_hit_rate_over_every_file_type(qwen: Server, capsys: pytest.CaptureFixture[str]) -> None:
    upload = [("files", (name, content)) for name, content, _, _ in FACTS]
    r = requests.post(f"{qwen.url}/v1/knowledge/files", files=upload, headers=qwen.headers(), timeout=300)
    assert r.status_code == 200, r.text
    hits = 0
    lines = []
    for name, _, question, words in FACTS:
        data = ask(qwen, question).json()
        assert data["sources"][0]["source"] == name, (question, data["sources"])  # retrieval: always right
        found = any(w.lower() in data["response"].lower() for w in words)
        hits += found
        lines.append(f"{'HIT ' if found else 'MISS'} {name}: {question} -> {data['response'][:120]!r}")
    with capsys.disabled():
        print(f"\nknowledge answers with qwen2.5-0.5b: {hits}/{len(FACTS)} hold the fact")
        print("\n".join(lines))
    assert hits >= len(FACTS) // 2  # a 0.5B model: report the rate, demand only a majority
