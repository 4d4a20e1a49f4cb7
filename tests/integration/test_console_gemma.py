"""The source's flow with a real model: deploy the bundled gemma3-270m on llama.cpp through the console,
wait until ready, call it through the gateway (HTTP, stream, WebSocket), then delete it."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_console import (
    ConsoleProcess,
    alive,
    call,
    nul_chunks,
    running_console,
    websocket_round,
)

pytestmark = pytest.mark.integration
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProcess]:
    with running_console(tmp_path_factory.mktemp("console_gemma")) as running:
        yield running


def test_deploy_the_bundled_model_and_call_it(console: ConsoleProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    out = console.cli(
        "deploy", "--name", "llm_demo001", "--model", "gemma3-270m",
        "--serve-args", "--api-only --threads 2 --max-new-tokens 16 --ctx-size 2048",
    )  # fmt: skip
    ready_after = time.monotonic() - started
    print(f"\ngemma3-270m deploy-to-ready through the console: {ready_after:.1f}s")
    assert out.returncode == 0, out.stdout + out.stderr + console.log()
    service = console.describe("llm_demo001")
    assert service["spec"]["model"] == "gemma3-270m" and service["status"] == "running"
    endpoint, token = service["invocation"]["endpoint"], service["token"]

    greedy = call(endpoint, token, PROMPT, max_new_tokens=6, temperature=0).json()
    assert "Paris" in greedy["response"], greedy
    chunks = nul_chunks(call(endpoint, token, PROMPT, use_stream_chat=True, temperature=0, max_new_tokens=8))
    assert chunks[-1]["usage"]["completion_tokens"] <= 8 and chunks[-1]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["response"].strip()
    assert websocket_round(endpoint, token, "Hello").strip()

    pid = service["instances"][0]["pid"]
    assert console.cli("delete", "llm_demo001").returncode == 0
    assert not alive(pid) and json.loads(console.cli("list", "--json").stdout) == []
