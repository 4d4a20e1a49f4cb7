"""The console page in Debian's Chromium under its Content-Security-Policy: its script runs (no CSP
violation), the buttons work through the one delegated listener, and the admin token is kept in
the page's memory only (not in sessionStorage, which every WebUI behind the gateway shares)."""

from __future__ import annotations

from pathlib import Path

import pytest

from easllm.control.app import create_console_app
from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry
from easllm.control.spec import parse_spec
from tests.browser import chromium, serve_in_thread

pytestmark = pytest.mark.integration
ADMIN = "page-admin-token"


def test_the_console_page_works_under_its_csp(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    registry.create_service(parse_spec({"name": "parked", "engine": "fake", "token": "svc-page-token"}))
    registry.set_version_status("parked", 1, "active")
    registry.update_service("parked", desired="stopped", status="stopped")
    app = create_console_app(ConsoleConfig(state_dir=tmp_path, admin_token=ADMIN), registry)
    with serve_in_thread(app) as url, chromium() as browser:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"{url}/", wait_until="load")
        page.fill("#admin", ADMIN)
        page.click("#save-admin")
        page.wait_for_selector("text=parked", timeout=15_000)
        page.click("button[data-action=invocation]")
        page.wait_for_selector("#info[open]", timeout=15_000)
        assert page.inner_text("#tok") != "svc-page-token"  # hidden until "Show"
        page.click("#reveal")
        assert page.inner_text("#tok") == "svc-page-token"
        page.click("#info button[data-action=close]")
        page.wait_for_function("!document.querySelector('#info').open", timeout=15_000)
        assert page.evaluate("sessionStorage.length + localStorage.length") == 0
        assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
    registry.close()
