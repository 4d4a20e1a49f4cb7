"""One error policy: `failure(exc)` for every exception type, and every transport writing what it
says — HTTP (status, body, Retry-After), the SSE stream, the EAS NUL stream, the WebSocket, the WebUI."""

import json
from collections.abc import Iterator

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from easllm.config import SamplingDefaults
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.base import EngineError as ReExportedEngineError
from easllm.engine.types import GenerationRequest
from easllm.errors import (
    Conflict,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    NotReady,
    StorageFull,
    StoreUnavailable,
    TooLarge,
    UnsupportedMedia,
    failure,
)
from easllm.server.routes.websocket import EOS
from easllm.webui.chat_tab import _page_error
from tests.apps import start


@pytest.mark.parametrize(
    ("exc", "status", "kind", "param", "retry_after"),
    [
        (InvalidRequest("bad seed", "seed"), 400, "invalid_request_error", "seed", None),
        (TooLarge("too big", "body"), 413, "invalid_request_error", "body", None),
        (UnsupportedMedia("no .exe", "files"), 415, "invalid_request_error", "files", None),
        (Conflict("other embedder", "files"), 409, "invalid_request_error", "files", None),
        (StorageFull("disk full", "files"), 507, "insufficient_storage", "files", None),
        (NotReady("the model is still loading"), 503, "service_unavailable", None, 1),
        (StoreUnavailable("database locked"), 503, "service_unavailable", None, 1),
        (EngineOverloaded("the engine queue is full"), 503, "service_unavailable", None, 1),
        (EngineError("decode failed"), 500, "server_error", None, None),
        (RuntimeError("boom"), 500, "server_error", None, None),
    ],
)
def test_each_exception_maps_to_one_answer(
    exc: Exception, status: int, kind: str, param: str | None, retry_after: int | None
) -> None:
    failed = failure(exc)
    assert (failed.status, failed.type, failed.param, failed.retry_after) == (
        status,
        kind,
        param,
        retry_after,
    )
    assert str(exc) in failed.message
    assert failed.body() == {
        "error": {"message": failed.message, "type": kind, "param": param, "code": status}
    }


def test_engine_code_keeps_importing_its_errors_from_engine_base() -> None:
    assert ReExportedEngineError is EngineError and issubclass(EngineOverloaded, EngineError)


class FailingEngine(FakeEngine):
    """A prompt with [fail] yields two tokens, then decoding fails; [full] finds the queue full."""

    async def generate(self, req: GenerationRequest):  # type: ignore[override]
        prompt = self.detokenize(req.prompt_token_ids)
        if "[full]" in prompt:
            raise EngineOverloaded("the engine queue is full")
        count = 0
        async for delta in super().generate(req):
            yield delta
            count += 1
            if "[fail]" in prompt and count == 2:
                raise EngineError("decode failed")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with start(FailingEngine(), sampling=SamplingDefaults(max_new_tokens=16)) as c:
        yield c


def test_a_full_queue_is_a_503_with_retry_after_on_every_http_api(client: TestClient) -> None:
    chat = {"messages": [{"role": "user", "content": "[full]"}]}
    for path, body in [("/", {"prompt": "[full]"}), ("/v1/chat/completions", chat)]:
        for streaming in (False, True):
            flag = {"use_stream_chat": True} if path == "/" else {"stream": True}
            r = client.post(path, json={**body, **(flag if streaming else {})})
            assert r.status_code == 503, (path, streaming, r.text)
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "service_unavailable"
            assert "queue is full" in r.json()["error"]["message"]


def test_a_bad_field_is_a_400_without_retry_after(client: TestClient) -> None:
    r = client.post("/", json={"prompt": "x", "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "retry-after" not in r.headers


def test_the_eas_stream_ends_with_an_error_chunk_when_generation_fails_midway(client: TestClient) -> None:
    r = client.post("/", json={"prompt": "hello [fail]", "use_stream_chat": True})
    assert r.status_code == 200
    assert r.content.endswith(b"\0")
    parts = [json.loads(p) for p in r.content.split(b"\0") if p]
    assert len(parts) == 3  # two answer chunks, then the error, then the stream ends
    assert all("response" in p and "error" not in p for p in parts[:2])
    assert parts[-1] == {
        "error": {"message": "decode failed", "type": "server_error", "param": None, "code": 500}
    }


def test_the_sse_stream_ends_with_an_error_event_and_no_done(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "hello [fail]"}], "stream": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"] == {
        "message": "decode failed",
        "type": "server_error",
        "param": None,
        "code": 500,
    }


def test_the_websocket_sends_the_error_then_eos_and_keeps_the_connection(client: TestClient) -> None:
    with client.websocket_connect("/") as ws:
        ws.send_text(json.dumps({"prompt": "hello [fail]"}))
        messages = []
        while (message := ws.receive_text()) != EOS:
            messages.append(json.loads(message))
        assert len(messages) == 3 and "response" in messages[0]
        assert messages[-1]["error"]["code"] == 500 and messages[-1]["error"]["message"] == "decode failed"
        ws.send_text(json.dumps({"prompt": "[full]"}))
        refused = json.loads(ws.receive_text())
        assert refused["error"]["code"] == 503 and refused["error"]["type"] == "service_unavailable"
        assert ws.receive_text() == EOS
        ws.send_text(json.dumps({"prompt": "after [eos]"}))
        assert json.loads(ws.receive_text())["response"].startswith("You said: after [eos]")


def test_the_webui_shows_the_policys_message() -> None:
    busy = _page_error(EngineOverloaded("the engine queue is full"))
    assert isinstance(busy, gr.Error) and busy.message == "the engine queue is full: try again in a moment."
    refused = _page_error(InvalidRequest("the prompt is 9000 tokens", "prompt"))
    assert refused.message == "the prompt is 9000 tokens" and refused.duration is None
