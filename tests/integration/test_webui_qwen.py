"""The WebUI's real path: `easllm serve` with the bundled Qwen chat model, driven in Chromium.

Log in with the token, watch an answer stream in, a second round that needs the first, Stop on a
long answer (the server counts the abort), then DOCX and PDF files indexed and asked about, with
the source file named under the answer. Saves a screenshot of each tab (test-artifacts/; with
EASLLM_UPDATE_SCREENSHOTS=1 also docs/images/, the README's pictures).
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import (
    ask,
    chromium,
    last_answer,
    open_webui,
    require_chromium,
    screenshot,
    send_message,
    set_number,
    upload,
    wait_until,
)
from tests.rag_samples import DOCX_FACT, PDF_FACT_PAGE_2, docx_bytes, pdf_bytes
from tests.servers import Server, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "qwen-webui-token"
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_chromium()
    tmp = tmp_path_factory.mktemp("qwen-webui")
    args = [
        "--max-new-tokens",
        "160",
        "--threads",
        "2",
        "--temperature",
        "0",
        "--data-dir",
        str(tmp / "data"),
    ]
    with running_server(args, tmp, token=TOKEN) as server:
        yield server


def publish(path: Path) -> None:
    if os.environ.get("EASLLM_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / path.name.replace("-qwen", ""))


def test_qwen_in_the_browser(qwen: Server, tmp_path: Path) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1500})  # both tabs fit, for pictures
        page.set_default_timeout(60_000)
        open_webui(page, qwen.url, TOKEN)
        assert "qwen2.5-0.5b-instruct" in page.locator("#easllm-header").inner_text()
        page.get_by_text("System prompt and parameters").click()
        set_number(page, "max-new-tokens", 48)

        # Round one streams in: the answer is seen growing, then complete.
        states: list[str] = []
        first = ask(page, "My name is Aiko. Say hello to me in one short sentence.", timeout=180, seen=states)
        assert "Aiko" in first
        assert len({s for s in states if s and s != first}) >= 2, states

        # Round two needs round one.
        assert "Aiko" in ask(page, "What is my name? Answer with the name only.", timeout=180)
        publish(screenshot(page, "webui-chat-qwen.png"))

        # Stop halts a long answer, and the server counts the abort.
        aborted = qwen.health()["engine"]["aborted_total"]
        set_number(page, "max-new-tokens", 160)
        send_message(page, "Write a long, detailed essay about the history of computers.")
        wait_until(lambda: len(last_answer(page).split()) >= 8, timeout=180, what="the essay to start")
        page.locator("#chat-stop").click()
        wait_until(
            lambda: qwen.health()["engine"]["aborted_total"] == aborted + 1, timeout=20, what="the abort"
        )
        stopped = last_answer(page)
        page.wait_for_timeout(1000)
        assert last_answer(page) == stopped

        # The knowledge base: a DOCX and a PDF with facts found nowhere else, and a refused file.
        files = {
            "generator.docx": docx_bytes("Maintenance", ["Weekly checks.", DOCX_FACT]),
            "warehouse.pdf": pdf_bytes(
                [["Warehouse handbook", "Opening hours are 8 to 5."], [PDF_FACT_PAGE_2]]
            ),
            "photo.png": b"\x89PNG\r\n\x1a\n not a document",
        }
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        page.get_by_role("tab", name="Knowledge base (LangChain)").click()
        upload(page, [tmp_path / n for n in files])
        page.locator("#kb-index").click()
        status = page.locator("#kb-status")
        wait_until(lambda: "indexed (embedder" in status.inner_text(), timeout=180, what="indexing")
        text = status.inner_text()
        assert "added generator.docx" in text and "added warehouse.pdf: 2 chunks, 2 pages" in text
        assert "refused photo.png: unsupported file type .png" in text

        ask(page, "What is the warehouse door code?", "kb", timeout=180)
        chat = page.locator("#kb-chatbot")
        assert "7351" in chat.inner_text()
        assert chat.get_by_text("Sources: warehouse.pdf (p. 2)").count() == 1
        excerpt = chat.locator(".thought-group").get_by_text("door code is 7351 and it changes every March")
        excerpt.wait_for()  # the excerpt shows under the answer (the note opens with a short slide)
        publish(screenshot(page, "webui-knowledge-qwen.png"))

        ask(page, "When is the emergency generator tested?", "kb", timeout=180)
        assert chat.get_by_text("Sources: generator.docx").count() == 1
        assert "Tuesday" in chat.inner_text()
