"""The WebUI in headless Chromium against a served app on the fake engine (deterministic, slowed
down so that streaming and Stop can be watched): login, streaming chat, rounds, Stop, knowledge base."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page

from easllm.app import create_app
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from tests.browser import (
    ask,
    chromium,
    last_answer,
    open_webui,
    require_chromium,
    screenshot,
    send_message,
    serve_in_thread,
    set_number,
    upload,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "browser-s3cret"
TOKEN_DELAY = 0.03  # seconds per fake token: 40 tokens stream for ~1.2 s


@dataclass
class Service:
    url: str
    engine: FakeEngine

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()["engine"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_chromium()
    engine = FakeEngine(token_delay=TOKEN_DELAY)
    config = ServerConfig(
        token=TOKEN,
        data_dir=tmp_path_factory.mktemp("webui") / "data",
        sampling=SamplingDefaults(max_new_tokens=600),
    )
    with serve_in_thread(create_app(config, engine)) as url:
        yield Service(url, engine)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Browser, service: Service) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1500})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.requests = []  # every URL the page asked for
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    context.close()


def test_the_page_asks_for_the_token_and_loads_nothing_from_outside(page: Page, service: Service) -> None:
    page.goto(f"{service.url}/", wait_until="load")
    assert page.url == f"{service.url}/webui/"
    page.get_by_label("password").wait_for()
    assert page.locator("#chat-message").count() == 0
    page.get_by_label("username").fill("someone")
    page.get_by_label("password").fill("not-the-token")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect credentials").wait_for()
    assert page.locator("#chat-message").count() == 0
    page.get_by_label("username").fill("someone")  # the form empties it after a failure
    page.get_by_label("password").fill(TOKEN)
    page.get_by_role("button", name="Login").click()
    page.locator("#chat-message textarea").wait_for()
    banner = page.locator("#easllm-header").inner_text()
    assert "fake-model" in banner and "engine fake" in banner
    outside = [u for u in page.requests if not u.startswith(f"{service.url}/") and not u.startswith("data:")]
    assert outside == []  # no CDN fonts or scripts, no analytics


def test_chat_streams_keeps_rounds_and_stop_aborts_on_the_server(page: Page, service: Service) -> None:
    open_webui(page, service.url, TOKEN)
    page.get_by_text("System prompt and parameters").click()
    page.locator("#system-prompt textarea").fill("You are terse.")
    set_number(page, "max-new-tokens", 40)

    states: list[str] = []
    final = ask(page, "Hello there", seen=states)
    partial = {s for s in states if s and s != final}
    assert (
        final.startswith("You said: Hello there.") and len(final.split()) == 4 + 39
    )  # the echo, then 39 words
    assert len(partial) >= 2, states  # the answer grew in front of the user
    assert all(final.startswith(s.rstrip()) for s in partial)
    assert page.locator("#chat-message textarea").input_value() == ""
    assert "40 tokens in" in page.locator("#chat-stats").inner_text()

    second = ask(page, "And the second question", enter=True)  # Enter sends too
    assert second.startswith("You said: And the second question.")
    prompt = service.engine.detokenize(service.engine.requests[-1].prompt_token_ids)
    assert "You are terse." in prompt and "Hello there" in prompt and final in prompt  # round one went along
    screenshot(page, "webui-chat-fake.png")

    aborted = service.health()["aborted_total"]
    set_number(page, "max-new-tokens", 600)  # ~18 s of answer
    send_message(page, "Tell me a long story")
    wait_until(lambda: len(last_answer(page).split()) > 12, what="the long answer to start")
    page.locator("#chat-stop").click()
    wait_until(
        lambda: service.health()["aborted_total"] == aborted + 1, timeout=10, what="the server's abort"
    )
    assert service.health()["running"] == 0
    stopped = last_answer(page)
    page.wait_for_timeout(700)
    assert last_answer(page) == stopped and len(stopped.split()) < 300  # nothing more arrived

    metrics = requests.get(f"{service.url}/metrics", headers={"Authorization": TOKEN}, timeout=5).text
    assert 'easllm_rounds_total{api="webui",finish_reason="length"} 2.0' in metrics
    assert 'easllm_rounds_total{api="webui",finish_reason="abort"} 1.0' in metrics

    page.locator("#chat-clear").click()
    wait_until(lambda: page.locator("#chat-chatbot [data-testid='bot']").count() == 0, what="the clear")


def test_knowledge_tab_indexes_answers_with_sources_and_shows_errors(
    page, service: Service, tmp_path: Path
) -> None:
    open_webui(page, service.url, TOKEN)
    page.get_by_role("tab", name="Knowledge base (LangChain)").click()

    send_message(page, "Anything in there?", "kb")  # nothing indexed yet: the error shows in the page
    page.get_by_text("The knowledge base is empty").first.wait_for()

    guide = tmp_path / "install.md"
    guide.write_text(
        "# Setup\n\n## Install\n\nRun pip install deepspeed==0.14.2 inside the env named zephyr.\n"
    )
    binary = tmp_path / "tool.exe"
    binary.write_bytes(b"MZ\x90\x00 not a document")
    upload(page, [guide, binary])
    page.locator("#kb-index").click()
    status = page.locator("#kb-status")
    wait_until(lambda: "indexed (embedder" in status.inner_text(), timeout=90, what="indexing")
    text = status.inner_text()
    assert "added install.md: 1 chunk" in text
    assert "refused tool.exe: unsupported file type .exe" in text
    assert "install.md" in page.locator("#kb-files").inner_text()

    ask(page, "How do I install deepspeed? [eos]", "kb")
    assert page.locator("#kb-chatbot").get_by_text("Sources: install.md").count() == 1
    sources = page.locator("#kb-chatbot .thought-group")  # the note under the answer, open
    sources.get_by_text("Run pip install deepspeed==0.14.2").wait_for()
    assert "deepspeed==0.14.2" in page.locator("#kb-chatbot").inner_text()
    screenshot(page, "webui-knowledge-fake.png")

    page.locator("#kb-delete-choice input").click()
    page.get_by_role("option", name="install.md").click()
    page.locator("#kb-delete").click()
    wait_until(lambda: "deleted install.md" in status.inner_text(), what="the delete")
    assert "install.md" not in page.locator("#kb-files").inner_text()
