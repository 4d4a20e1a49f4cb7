"""Limits: body size, uploads per request, prompt length, max_new_tokens, WebSocket message size and
queue, concurrent connections. Each refusal is a clear 4xx/503 naming the limit, and nothing is
generated for a refused request."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from easllm.cli import build_parser, configs_from
from easllm.config import KnowledgeConfig, LimitsConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.server.routes.websocket import EOS
from tests.apps import serving

TOKEN = "limits-token"
AUTH = {"Authorization": TOKEN}
KB = 1024


@contextmanager
def start(engine: FakeEngine, tmp: Path, **limits: float) -> Iterator[TestClient]:
    config = ServerConfig(
        token=TOKEN,
        api_only=True,
        data_dir=tmp,
        sampling=SamplingDefaults(max_new_tokens=8),
        knowledge=KnowledgeConfig(max_file_mb=0.1),
        limits=LimitsConfig(**limits),  # type: ignore[arg-type]
    )
    with serving(config, engine) as client:
        yield client


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=512)


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    with start(engine, tmp_path, max_body_mb=4 / 1024, max_upload_files=2, ws_max_pending=3) as c:
        yield c


def error(r, status: int, param: str | None = None) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == status and body["param"] == param
    return body["message"]


def answer(ws) -> list[dict]:  # type: ignore[no-untyped-def]
    messages = []
    while (text := ws.receive_text()) != EOS:
        messages.append(json.loads(text))
    return messages


# -- body size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions", "/v1/completions", "/v1/knowledge/query"])
def test_a_declared_body_over_max_body_mb_is_413_before_the_route_runs(
    client: TestClient, engine: FakeEngine, path: str
) -> None:
    body = json.dumps({"prompt": "x" * 5 * KB, "messages": [{"role": "user", "content": "y"}]})
    message = error(client.post(path, content=body, headers=AUTH), 413, "body")
    assert "--max-body-mb" in message and str(4 * KB) in message and str(len(body)) in message
    assert engine.requests == []


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(client: TestClient, engine: FakeEngine) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the middleware counts the bytes
        for _ in range(64):
            yield b"x" * KB

    message = error(client.post("/", content=chunks(), headers=AUTH), 413, "body")
    assert "--max-body-mb" in message and engine.requests == []


def test_a_body_at_the_limit_passes(client: TestClient, engine: FakeEngine) -> None:
    prompt = "p" * (4 * KB - len('{"prompt": ""}'))
    r = client.post("/", json={"prompt": prompt}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # too long for the context...
    assert "context" in r.json()["error"]["message"]  # ...which is the next limit, not the body's
    r = client.post("/", content=b"q" * (4 * KB), headers=AUTH)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_uploads_have_their_own_limit_and_a_file_count(client: TestClient) -> None:
    text = ("A line of the manual. " * 230).encode()  # 5 KB: over --max-body-mb, under the file limit
    r = client.post("/v1/knowledge/files", files=[("files", ("manual.txt", text))], headers=AUTH)
    assert r.status_code == 200 and r.json()["files"][0]["name"] == "manual.txt"
    three = [("files", (f"f{i}.txt", b"some text")) for i in range(3)]
    message = error(client.post("/v1/knowledge/files", files=three, headers=AUTH), 413, "files")
    assert "at most 2 files" in message and "--max-upload-files" in message
    listed = client.get("/v1/knowledge/files", headers=AUTH).json()
    assert [f["name"] for f in listed["files"]] == ["manual.txt"]
    big = b"z" * int(0.1 * 1024 * KB * 2 + 2 * 1024 * KB)  # over 2 files x 0.1 MB plus slack
    r = client.post("/v1/knowledge/files", files=[("files", ("big.txt", big))], headers=AUTH)
    assert "--kb-max-file-mb x --max-upload-files" in error(r, 413, "body")


# -- prompt length and max_new_tokens ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/", {"prompt": "w" * 600}, "prompt"),
        ("/", {"prompt": "q", "system_prompt": "s" * 600}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w" * 600}]}, "messages"),
        ("/v1/completions", {"prompt": "w" * 600}, "prompt"),
    ],
)
def test_a_prompt_longer_than_the_context_is_400(
    engine: FakeEngine, tmp_path: Path, path: str, body: dict, param: str
) -> None:
    with start(engine, tmp_path) as client:
        message = error(client.post(path, json=body, headers=AUTH), 400, param)
        assert "context" in message and "512" in message
    assert engine.requests == []


def test_max_new_tokens_is_capped_at_the_server_limit_on_every_api(client: TestClient) -> None:
    r = client.post("/", json={"prompt": "hi", "max_new_tokens": 10**9}, headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == 8 and r.json()["finish_reason"] == "length"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}
    r = client.post("/v1/chat/completions", json=chat, headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == 8
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10**9}, headers=AUTH)
    assert r.json()["usage"]["completion_tokens"] == 8
    with client.websocket_connect("/", headers=AUTH) as ws:
        ws.send_text(json.dumps({"prompt": "hi", "max_new_tokens": 10**9}))
        assert answer(ws)[-1]["usage"]["completion_tokens"] == 8


# -- WebSocket ---------------------------------------------------------------------------------------


def test_an_oversized_websocket_message_is_a_413_in_its_turn_and_the_connection_stays(
    client: TestClient, engine: FakeEngine
) -> None:
    with client.websocket_connect("/", headers=AUTH) as ws:
        ws.send_text(json.dumps({"prompt": "first [eos]"}))
        ws.send_text(json.dumps({"prompt": "y" * 5 * KB}))
        ws.send_bytes(b"z" * 5 * KB)
        ws.send_text(json.dumps({"prompt": "last [eos]"}))
        assert answer(ws)[-1]["response"] == "You said: first [eos]."
        for _ in range(2):
            (refusal,) = answer(ws)
            assert refusal["error"]["code"] == 413 and refusal["error"]["param"] == "body"
            assert "--max-body-mb" in refusal["error"]["message"]
        assert answer(ws)[-1]["response"] == "You said: last [eos]."
    assert len(engine.requests) == 2


def test_ws_max_pending_closes_a_flooding_connection_with_1008(engine: FakeEngine, tmp_path: Path) -> None:
    slow = FakeEngine(context_length=512, token_delay=0.05)
    with start(slow, tmp_path, ws_max_pending=3) as client, client.websocket_connect("/", headers=AUTH) as ws:
        for i in range(6):
            ws.send_text(f"message {i}")
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                ws.receive_text()
    assert closed.value.code == 1008 and "--ws-max-pending" in closed.value.reason
    deadline = time.monotonic() + 5
    while slow.health().running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.health().running == 0


# -- concurrent connections ---------------------------------------------------------------------------


def test_one_connection_over_the_limit_is_503_with_retry_after_and_probes_still_answer(
    engine: FakeEngine, tmp_path: Path
) -> None:
    with start(engine, tmp_path, max_connections=2) as client:
        with client.websocket_connect("/", headers=AUTH), client.websocket_connect("/", headers=AUTH):
            r = client.post("/", json={"prompt": "hi"}, headers=AUTH)
            message = error(r, 503)
            assert r.headers["retry-after"] == "1" and "--max-connections" in message and "2" in message
            with pytest.raises(WebSocketDenialResponse) as denied:
                client.websocket_connect("/", headers=AUTH).__enter__()
            assert denied.value.status_code == 503 and denied.value.headers["retry-after"] == "1"
            for probe in ("/live", "/health", "/ready"):  # never counted, never refused
                assert client.get(probe).status_code == 200
            assert engine.requests == []
        r = client.post("/", json={"prompt": "hi"}, headers=AUTH)  # the slots are free again
        assert r.status_code == 200


# -- flags ------------------------------------------------------------------------------------------


def test_limit_flags_map_onto_the_config() -> None:
    flags = "--max-body-mb 2.5 --max-upload-files 4 --max-connections 9 --ws-max-pending 7"
    flags += " --cors-origin https://a.example --cors-origin http://b"
    args = build_parser().parse_args(["serve", *flags.split()])
    server, _ = configs_from(args)
    assert server.limits == LimitsConfig(
        max_body_mb=2.5, max_upload_files=4, max_connections=9, ws_max_pending=7
    )
    assert server.cors_origins == ("https://a.example", "http://b")
    default, _ = configs_from(build_parser().parse_args(["serve"]))
    assert default.limits == LimitsConfig() and default.cors_origins == ()


@pytest.mark.parametrize(
    "flag", [["--max-body-mb", "0"], ["--max-upload-files", "0"], ["--max-connections", "-1"]]
)
def test_limit_flags_refuse_nonsense(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *flag])
    assert "out of range" in capsys.readouterr().err
