"""Browser-test helpers: Debian's Chromium under Playwright, an app served on a loopback thread,
and the WebUI's page actions (log in, send, read the chat).

Chromium is Debian's (`make chromium` installs it); Playwright never downloads a browser. The flags
keep it off the network: the closed network refuses Chromium's background connections.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page

from tests.servers import free_port

CHROMIUM = Path(os.environ.get("EASLLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get("EASLLM_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")
)


def require_chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"browser tests need Debian's Chromium at {CHROMIUM}: run `make chromium` "
            "(apt-get install chromium, as root) or set EASLLM_CHROMIUM"
        )
    return CHROMIUM


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium; yields a Playwright Browser. Playwright gives each launch a fresh
    temporary profile (user-data dir) and removes it; each test opens its own context (cookies)."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def serve_in_thread(app: FastAPI, timeout: float = 60) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in this process; stop it on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert thread.is_alive(), "the server thread died"
            assert time.monotonic() < deadline, f"the server was not ready in {timeout}s"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(
    check: Callable[[], object], timeout: float = 30, interval: float = 0.1, what: str = ""
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


# -- the WebUI's page ------------------------------------------------------------------------------


def open_webui(page: Page, url: str, token: str | None) -> None:
    """Open the service's root as a browser does (redirected to /webui/) and log in if asked."""
    page.goto(f"{url}/", wait_until="load")
    if token is not None:
        page.get_by_label("username").fill("tester")
        page.get_by_label("password").fill(token)
        page.get_by_role("button", name="Login").click()
    page.locator("#chat-message textarea").wait_for(timeout=60_000)


def last_answer(page: Page, prefix: str = "chat") -> str:
    bots = page.locator(f"#{prefix}-chatbot [data-testid='bot']")
    count = bots.count()
    return bots.nth(count - 1).inner_text() if count else ""


def send_message(page: Page, text: str, prefix: str = "chat", enter: bool = False) -> None:
    """Type a message and press Send (or Enter in the box)."""
    box = page.locator(f"#{prefix}-message textarea")
    box.fill(text)
    if enter:
        box.press("Enter")
    else:
        page.locator(f"#{prefix}-send").click()


def set_number(page: Page, elem_id: str, value: float) -> None:
    """Type into a slider's number box (Gradio applies it on blur)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def screenshot(page: Page, name: str) -> Path:
    """The page as shown (notices closed) into test-artifacts/. Not `full_page`: resizing the
    viewport re-renders the chat, and its source notes would be caught mid-slide."""
    for close in page.locator(".toast-close").all():
        close.click()
    page.wait_for_timeout(400)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def upload(page: Page, paths: list[Path], elem_id: str = "kb-upload") -> None:
    """Choose files in a Gradio File box and wait until each is listed (name and extension are
    shown apart, so the stems are matched)."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files([str(p) for p in paths])
    box = page.locator(f"#{elem_id}")
    wait_until(lambda: all(p.stem in box.inner_text() for p in paths), what="the upload")


def bot_messages(page: Page, prefix: str = "chat") -> int:
    return page.locator(f"#{prefix}-chatbot [data-testid='bot']").count()


def answer_finished(page: Page, prefix: str = "chat") -> bool:
    return "tokens/s)" in page.locator(f"#{prefix}-stats").inner_text()


def ask(
    page: Page,
    text: str,
    prefix: str = "chat",
    timeout: float = 60,
    seen: list[str] | None = None,
    enter: bool = False,
) -> str:
    """Send a message and wait for its whole answer (a new answer bubble, then the stats line);
    `seen` collects the answer as it was at each look, to show that it streamed."""
    before = bot_messages(page, prefix)
    send_message(page, text, prefix, enter)
    wait_until(lambda: bot_messages(page, prefix) > before, timeout=timeout, what=f"the answer to {text!r}")

    def done() -> bool:
        if seen is not None:
            seen.append(last_answer(page, prefix))
        return answer_finished(page, prefix)

    wait_until(done, timeout=timeout, interval=0.05, what=f"the end of the answer to {text!r}")
    return last_answer(page, prefix)
