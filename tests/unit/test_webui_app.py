"""The WebUI on the service's app over the fake engine: mounting, redirect, --no-api / --api-only,
the token gate, and the chat and knowledge-base handlers the page calls."""

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from easllm.config import KnowledgeConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.rag.embedder import SharedEmbedder
from easllm.rag.knowledge import KnowledgeBase
from easllm.serving.chat import ChatServing
from easllm.webui.app import model_banner
from easllm.webui.chat_tab import ChatResponder
from easllm.webui.knowledge_tab import KnowledgeActions
from tests.apps import serving

TOKEN = "webui-s3cret"
HTML = {"Accept": "text/html,application/xhtml+xml"}


@contextmanager
def start(tmp_path: Path, **config: object) -> Iterator[TestClient]:
    settings: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "sampling": SamplingDefaults(max_new_tokens=8),
    }
    with serving(ServerConfig(**{**settings, **config}), FakeEngine(context_length=512)) as client:  # type: ignore[arg-type]
        yield client


def login(client: TestClient, password: str = TOKEN) -> int:
    return client.post("/webui/login", data={"username": "anyone", "password": password}).status_code


# -- mounting and routing ---------------------------------------------------------------------------


def test_browsers_are_sent_to_the_webui_and_post_stays_the_api(tmp_path: Path) -> None:
    with start(tmp_path) as client:
        r = client.get("/", headers=HTML, follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/webui/"
        r = client.get("/", follow_redirects=False)  # an API client's GET
        assert r.status_code == 405 and "POST /" in r.json()["error"]["message"]
        assert client.post("/", content=b"hi [eos]").text == "You said: hi [eos]."
        page = client.get("/webui/")
        assert page.status_code == 200 and "<html" in page.text
        config = client.get("/webui/config").json()  # the page's layout, built at the first request
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"chat-send", "chat-stop", "chat-clear", "kb-upload", "kb-index", "kb-files"} <= ids
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Max new tokens", "Temperature (0 = greedy)", "Top p", "Top k (0 = off)"} <= labels


def test_api_only_serves_no_webui(tmp_path: Path) -> None:
    with start(tmp_path, api_only=True) as client:
        assert client.get("/webui/").status_code == 404
        assert client.get("/", headers=HTML, follow_redirects=False).status_code == 405
        assert client.post("/", content=b"hi [eos]").status_code == 200
        assert client.get("/v1/models").status_code == 200
        assert not hasattr(client.app.state, "webui")  # type: ignore[attr-defined]


def test_no_api_serves_only_the_webui(tmp_path: Path) -> None:
    with start(tmp_path, no_api=True) as client:
        r = client.get("/", follow_redirects=False)  # every client is sent to the page
        assert r.status_code == 307 and r.headers["location"] == "/webui/"
        assert client.post("/", json={"prompt": "hi"}).status_code in (404, 405)
        assert client.get("/v1/models").status_code == 404
        assert client.get("/v1/knowledge/files").status_code == 404
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/") as ws:
            ws.receive_text()
        assert client.get("/webui/").status_code == 200
        assert client.get("/health").status_code == 200


# -- the token ---------------------------------------------------------------------------------------

LOCKED = [
    ("GET", "/webui/config"),
    ("GET", "/webui/gradio_api/info"),
    ("GET", "/webui/gradio_api/openapi.json"),
    ("GET", "/webui/gradio_api/heartbeat/abc"),
    ("GET", "/webui/gradio_api/queue/data?session_hash=abc"),
    ("GET", "/webui/gradio_api/file=/etc/hostname"),
    ("GET", "/webui/gradio_api/upload_progress?upload_id=x"),
    ("POST", "/webui/gradio_api/queue/join"),
    ("POST", "/webui/gradio_api/upload"),
    ("POST", "/webui/gradio_api/cancel"),
    ("POST", "/webui/gradio_api/reset"),
    ("GET", "/webui/gradio_api/token"),
]


def test_with_a_token_nothing_but_the_login_page_is_reachable(tmp_path: Path) -> None:
    with start(tmp_path, token=TOKEN) as client:
        for method, path in LOCKED:
            r = client.request(method, path)
            assert r.status_code == 401, (method, path, r.status_code)
        # The token in Authorization (what the console's gateway sends once it has checked the
        # browser's ?token=) is a login; a wrong one is not.
        assert client.get("/webui/config", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/webui/config", headers={"Authorization": "wrong"}).status_code == 401
        assert "chat-send" in client.get("/webui/", headers={"Authorization": TOKEN}).text
        page = client.get("/webui/")  # the login form only: no layout, no API description
        assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
        assert "chat-send" not in page.text
        assert login(client, "wrong") == 400
        assert client.get("/webui/config").status_code == 401
        assert login(client) == 200
        config = client.get("/webui/config")
        assert config.status_code == 200 and "kb-index" in config.text
        client.get("/webui/logout", follow_redirects=False)
        assert client.get("/webui/config").status_code == 401
        assert client.post("/", content=b"hi [eos]").status_code == 401  # the API still wants its header


def test_without_a_token_the_page_is_open(tmp_path: Path) -> None:
    with start(tmp_path) as client:
        assert client.get("/webui/config").status_code == 200


# -- the handlers behind the page's buttons ---------------------------------------------------------


@pytest.fixture
async def engine() -> FakeEngine:
    engine = FakeEngine(context_length=4096, token_delay=0.005)
    await engine.start()
    yield engine  # type: ignore[misc]
    await engine.close()


def knowledge(tmp_path: Path) -> KnowledgeBase:
    return KnowledgeBase(
        tmp_path / "kb", SharedEmbedder("multilingual-e5-small"), KnowledgeConfig(max_file_mb=0.01)
    )


async def send(responder: ChatResponder, message: str, chat: list, max_new_tokens: int = 12) -> list:
    states = [u async for u in responder.respond(message, chat, "Be brief.", max_new_tokens, 0.0, 1.0, 0)]
    assert states[0][:2] == (
        "",
        [*chat, {"role": "user", "content": message}, {"role": "assistant", "content": ""}],
    )
    return states


async def test_an_answer_streams_in_and_the_next_round_sees_the_first(
    engine: FakeEngine, tmp_path: Path
) -> None:
    responder = ChatResponder(ChatServing(engine, max_round=5))
    states = await send(responder, "Hello there", [])
    answers = [s[1][-1]["content"] for s in states]
    assert len(set(answers)) >= 3  # empty, partial..., complete
    assert all(b.startswith(a) for a, b in itertools.pairwise(answers))
    box, chat, stats = states[-1]
    assert box == "" and chat[-1]["content"].startswith("You said: Hello there. alpha beta")
    assert stats.startswith("12 tokens in") and "stopped at max new tokens" in stats

    await send(responder, "And again", chat)
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert "Be brief." in prompt and "Hello there" in prompt and chat[-1]["content"] in prompt
    assert prompt.rstrip().endswith("And again<|im_end|>\n<|im_start|>assistant")


async def test_closing_the_stream_aborts_the_engine_request(engine: FakeEngine) -> None:
    """What Stop does: Gradio closes the handler's generator; the engine request must end too."""
    responder = ChatResponder(ChatServing(engine, max_round=5))
    stream = responder.respond("long one", [], "", 2000, 0.0, 1.0, 0)
    for _ in range(4):
        await anext(stream)
    assert engine.health().running == 1
    await stream.aclose()
    deadline = time.monotonic() + 5
    while engine.health().aborted_total < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert engine.health().running == 0 and engine.health().finished_total == 0


async def test_chat_errors_are_raised_for_the_page(engine: FakeEngine, tmp_path: Path) -> None:
    responder = ChatResponder(ChatServing(engine, max_round=5))
    with pytest.raises(gr.Error, match="Type a message"):
        await anext(responder.respond("   ", [], "", 8, 0.0, 1.0, 0))
    with pytest.raises(gr.Error, match=r"the prompt is 5051 tokens; the model's context is 4096"):
        await anext(responder.respond("x" * 5000, [], "", 8, 0.0, 1.0, 0))
    kb_responder = ChatResponder(ChatServing(engine, 5, knowledge=knowledge(tmp_path)), use_knowledge=True)
    with pytest.raises(gr.Error, match="knowledge base is empty"):
        await anext(kb_responder.respond("What is in it?", [], "", 8, 0.0, 1.0, 0))
    assert engine.requests == []  # nothing reached the engine


async def test_index_reports_each_file_and_the_grounded_answer_lists_sources(
    engine: FakeEngine, tmp_path: Path
) -> None:
    kb = knowledge(tmp_path)
    files = {
        "install.md": b"# Setup\n\n## Install\n\nRun pip install deepspeed==0.14.2 in env zephyr.\n",
        "tool.exe": b"MZ\x90\x00",
        "empty.txt": b"",
        "big.txt": b"word " * 5000,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    actions = KnowledgeActions(kb)
    updates = [u async for u in actions.index([str(tmp_path / n) for n in files])]
    assert "indexing install.md (1 of 4)" in updates[0][2]
    cleared, rows, status, choices = updates[-1]
    assert cleared is None  # the upload box empties once indexed
    assert "**added** install.md: 1 chunk" in status
    assert "**refused** tool.exe: unsupported file type .exe" in status
    assert "**refused** empty.txt is empty" in status
    assert "**refused** big.txt is 25000 bytes; the limit is 0.01 MB" in status
    assert status.rstrip().endswith("1 file, 1 chunk indexed (embedder multilingual-e5-small).")
    assert [r[0] for r in rows] == ["install.md"] and choices["choices"] == ["install.md"]

    responder = ChatResponder(ChatServing(engine, 5, knowledge=kb), use_knowledge=True)
    ask = responder.respond("How do I install deepspeed? [eos]", [], "", 64, 0.0, 1.0, 0)
    states = [u async for u in ask]
    chat = states[-1][1]
    assert chat[-1]["metadata"]["title"] == "Sources: install.md"
    assert "pip install deepspeed==0.14.2" in chat[-1]["content"]
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert "env zephyr" in prompt.split("<|im_start|>user", 1)[0]  # the excerpt, in the system part

    rows, choices, status = await actions.delete(["install.md", "ghost.md"])
    assert rows == [] and "**deleted** install.md" in status and "**not found** ghost.md" in status
    with pytest.raises(gr.Error, match="Choose files first"):
        await anext(actions.index([]))


async def test_the_banner_names_model_and_engine_and_says_when_it_is_not_up() -> None:
    engine = FakeEngine(context_length=512)
    config = ServerConfig(service_name="demo001", token="t")
    assert "the model is loading…" in model_banner(engine, config)
    failed = model_banner(engine, config, "no file at /models/x.gguf")
    assert "**the model failed to load:** no file at /models/x.gguf" in failed
    await engine.start()
    try:
        ready = model_banner(engine, config)
    finally:
        await engine.close()
    assert "service `demo001`" in ready and "model **fake-model**" in ready and "engine **fake**" in ready
    assert "context 512 tokens · ready" in ready and "[Log out](logout)" in ready
    assert "Log out" not in model_banner(engine, ServerConfig())


async def test_rounds_go_through_the_services_round_hook_with_the_browser_session(engine: FakeEngine) -> None:
    """Metrics and the history export see WebUI rounds as they see API rounds."""
    seen: list[dict] = []

    class Hook:
        def watch(
            self, deltas: Any, api: str, caller: Any, conv: Any, gen: Any, sources: Any, choice: int
        ) -> Any:
            seen.append(
                {"api": api, "info": caller.info, "prompt": conv.prompt, "gen": gen, "choice": choice}
            )
            seen[-1].update(session=caller.session, client=caller.client)
            return deltas

    responder = ChatResponder(ChatServing(engine, max_round=5, observer=Hook()))  # type: ignore[arg-type]
    browser = SimpleNamespace(session_hash="sess-1", client=SimpleNamespace(host="10.0.0.9"))
    states = [u async for u in responder.respond("Hi [eos]", [], "", 8, 0.0, 1.0, 0, browser)]  # type: ignore[arg-type]
    assert states[-1][1][-1]["content"] == "You said: Hi [eos]."
    assert seen == [
        {
            "api": "webui",
            "info": None,
            "prompt": "Hi [eos]",
            "gen": engine.requests[-1],
            "choice": 0,
            "session": "sess-1",
            "client": "10.0.0.9",
        }
    ]
