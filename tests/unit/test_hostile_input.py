"""Hostile input, round 2 (issue 16), on one service over the fake engine: every bound is a 4xx
naming the field or limit, never a 500 or a hang; browsers of other sites are refused."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from easllm.app import create_app
from easllm.config import LimitsConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import FinishReason, Usage
from easllm.protocol import eas, openai
from easllm.protocol.eas import MAX_HISTORY_CHARS, MAX_HISTORY_ROUNDS, RoundReplies, reply
from easllm.protocol.validation import MAX_JSON_CONTAINERS, MAX_STOP_CHARS, MAX_STOP_STRINGS, UnknownFieldLog
from easllm.server.lockout import FailedTokens
from easllm.server.routes.websocket import Connection
from easllm.server.state import state_of
from tests.apps import serving

TOKEN = "hostile-token"
AUTH = {"Authorization": TOKEN}
DEEP = 5_000  # deeper than Python's parser goes, fewer brackets than MAX_JSON_CONTAINERS


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = ServerConfig(
        token=TOKEN, api_only=True, data_dir=tmp_path, sampling=SamplingDefaults(max_new_tokens=8)
    )
    with serving(config, FakeEngine(context_length=512)) as c:
        yield c


def error(r, status: int, param: str | None) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == status and body["param"] == param, body
    return str(body["message"])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- deep nesting, seeds, history, stop ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/", '{"prompt": "hi", "history": %s}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": %s}'),
        ("/v1/completions", '{"prompt": "hi", "x": %s}'),
        ("/v1/embeddings", '{"input": %s}'),
        ("/v1/knowledge/query", '{"query": "hi", "top_k": %s}'),
    ],
)
def test_json_nested_50000_deep_is_a_400_on_every_parser(client: TestClient, path: str, body: str) -> None:
    r = client.post(path, content=body % nested(DEEP), headers={**AUTH, "Content-Type": "application/json"})
    assert "nested too deeply" in error(r, 400, "body")


def test_bodies_with_more_arrays_than_any_request_needs_are_refused_before_parsing(
    client: TestClient,
) -> None:
    body = json.dumps({"prompt": "hi", "history": [["a", "b"]] * 200_000, "use_stream_chat": True})
    started = time.monotonic()
    r = client.post("/", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert str(MAX_JSON_CONTAINERS) in error(r, 400, "body")
    chat = {"messages": [{"role": "user", "content": "hi"}] * (MAX_JSON_CONTAINERS + 1)}
    assert str(MAX_JSON_CONTAINERS) in error(
        client.post("/v1/chat/completions", json=chat, headers=AUTH), 400, "body"
    )
    assert time.monotonic() - started < 5
    text = "[" * (MAX_JSON_CONTAINERS + 1)
    assert eas.parse_eas_body(text.encode(), "text/plain") == text  # as a plain-text prompt it is just text


def test_json_nested_deep_over_the_websocket_is_an_error_message(client: TestClient) -> None:
    with client.websocket_connect("/", headers=AUTH) as ws:
        ws.send_text('{"prompt": "hi", "history": ' + nested(DEEP) + "}")
        answer = json.loads(ws.receive_text())
        assert answer["error"]["code"] == 400 and "nested too deeply" in answer["error"]["message"]
        assert ws.receive_text() == "<EOS>"


def test_negative_and_uint64_seeds_map_onto_one_space(client: TestClient) -> None:
    def eas_answer(seed: int) -> str:
        r = client.post("/", json={"prompt": "tell me", "seed": seed, "temperature": 1.0}, headers=AUTH)
        assert r.status_code == 200, r.text
        return str(r.json()["response"])

    assert eas_answer(-1) == eas_answer(2**64 - 1)  # -1 is 2**64 - 1, as an int64 seed's bits
    chat = {"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63), "n": 3}
    r = client.post("/v1/chat/completions", json=chat, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**40])
def test_seeds_beyond_64_bits_are_a_400_naming_seed(client: TestClient, seed: int) -> None:
    error(client.post("/", json={"prompt": "hi", "seed": seed}, headers=AUTH), 400, "seed")
    chat = {"messages": [{"role": "user", "content": "hi"}], "seed": seed}
    error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 400, "seed")


def test_history_over_its_round_and_size_limits_is_a_400_naming_history(client: TestClient) -> None:
    rounds = [["a", "b"]] * (MAX_HISTORY_ROUNDS + 1)
    body = {"prompt": "hi", "history": rounds, "use_stream_chat": True}
    assert str(MAX_HISTORY_ROUNDS) in error(client.post("/", json=body, headers=AUTH), 400, "history")
    big = [["q" * (MAX_HISTORY_CHARS // 2), "a" * (MAX_HISTORY_CHARS // 2 + 1)]]
    message = error(client.post("/", json={"prompt": "hi", "history": big}, headers=AUTH), 400, "history")
    assert str(MAX_HISTORY_CHARS) in message
    with client.websocket_connect("/", headers=AUTH) as ws:
        ws.send_text(json.dumps({"prompt": "hi", "history": rounds}))
        answer = json.loads(ws.receive_text())
        assert answer["error"]["param"] == "history" and ws.receive_text() == "<EOS>"


def test_a_stream_with_the_largest_history_allowed_repeats_it_exactly(client: TestClient) -> None:
    rounds = [[f"q{i}", f'a{i}\n"é'] for i in range(MAX_HISTORY_ROUNDS)]
    body = {"prompt": "go", "history": rounds, "use_stream_chat": True}
    r = client.post("/", json=body, headers=AUTH)
    parts = [json.loads(p) for p in r.content.split(b"\0")[:-1]]
    assert len(parts) >= 2
    for part in parts:
        assert part["history"][:-1] == rounds and part["history"][-1][0] == "go"
        assert part["history"][-1][1] == part["response"]  # cumulative


@pytest.mark.parametrize(
    ("history", "prompt", "answer"),
    [([], "p", "a"), ([("q", "a")], 'with "quotes"', "é\n\0"), ([("1", "2"), ("", "")], "", "")],
)
def test_round_replies_are_the_json_of_the_reply_they_replace(
    history: list[tuple[str, str]], prompt: str, answer: str
) -> None:
    replies = RoundReplies(history, prompt)
    usage = Usage(prompt_tokens=3, completion_tokens=2)
    for args in [(), (usage, FinishReason.STOP), (usage, FinishReason.LENGTH, [{"source": "x"}])]:
        expected = json.dumps(reply(answer, [*history, (prompt, answer)], *args), ensure_ascii=False)
        assert replies.dumps(answer, answer, *args) == expected


@pytest.mark.parametrize(
    ("stop", "limit"),
    [
        ([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], str(MAX_STOP_STRINGS)),
        (["x" * (MAX_STOP_CHARS + 1)], ""),
    ],
)
def test_stop_lists_have_a_count_and_a_length_limit(client: TestClient, stop: list[str], limit: str) -> None:
    assert limit in error(client.post("/", json={"prompt": "hi", "stop": stop}, headers=AUTH), 400, "stop")
    chat = {"messages": [{"role": "user", "content": "hi"}], "stop": stop}
    error(client.post("/v1/chat/completions", json=chat, headers=AUTH), 400, "stop")
    ok = {"prompt": "hi", "stop": ["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS}
    assert client.post("/", json=ok, headers=AUTH).status_code == 200


# -- unknown fields in the log --------------------------------------------------------------------------


def test_unknown_field_names_are_logged_escaped_truncated_and_rate_limited(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eas, "log_unknown", UnknownFieldLog(eas.log))
    keys = {"forged\nINFO easllm: admin logged in": 1, **{f"k{i}" + "x" * 10_000: 1 for i in range(500)}}
    with caplog.at_level(logging.INFO, logger="easllm.protocol.eas"):
        for _ in range(3):
            assert client.post("/", json={"prompt": "hi", **keys}, headers=AUTH).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unknown fields" in r.getMessage()]
    assert len(lines) == 1  # once per interval, however many requests
    assert "\n" not in lines[0] and "\\n" in lines[0] and len(lines[0]) < 1000
    assert "and 493 more" in lines[0]


def test_the_next_log_after_the_interval_counts_what_it_skipped(caplog: pytest.LogCaptureFixture) -> None:
    log = UnknownFieldLog(logging.getLogger("test.unknown"), interval=0.05)
    with caplog.at_level(logging.INFO, logger="test.unknown"):
        for _ in range(3):
            log("Req", ["a"])
        time.sleep(0.06)
        log("Req", ["b"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "2 more requests with unknown fields" in messages[1]


def test_openai_unknown_fields_are_logged_the_same_way(
    client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openai, "log_unknown", UnknownFieldLog(openai.log))
    chat = {"messages": [{"role": "user", "content": "hi"}], "evil\r\nkey": 1}
    with caplog.at_level(logging.INFO, logger="easllm.protocol.openai"):
        assert client.post("/v1/chat/completions", json=chat, headers=AUTH).status_code == 200
    (line,) = [r.getMessage() for r in caplog.records if "unknown fields" in r.getMessage()]
    assert "\r" not in line and "\n" not in line and "evil\\r\\nkey" in line


# -- metrics labels ------------------------------------------------------------------------------------


def test_unknown_http_methods_share_one_metrics_label(tmp_path: Path) -> None:
    with serving(ServerConfig(api_only=True, data_dir=tmp_path), FakeEngine()) as client:
        for i in range(20):
            client.request(f"X{i}YZ", "/v1/models")
        text = client.get("/metrics").text
    assert 'method="other"' in text and "X1YZ" not in text


# -- WebSocket buffers ---------------------------------------------------------------------------------


def test_a_websocket_queueing_more_bytes_than_one_message_is_closed(tmp_path: Path) -> None:
    limits = LimitsConfig(max_body_mb=0.001)  # 1048 bytes: one message, and the whole queue
    config = ServerConfig(
        token=TOKEN, data_dir=tmp_path, limits=limits, sampling=SamplingDefaults(max_new_tokens=200)
    )
    with serving(config, FakeEngine(context_length=512, token_delay=0.02)) as client:
        with client.websocket_connect("/", headers=AUTH) as ws:
            ws.send_text("a slow first answer")
            for _ in range(3):
                ws.send_text("x" * 600)  # each fits; two waiting together do not
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    ws.receive_text()
        assert closed.value.code == 1008 and "1048 bytes waiting" in closed.value.reason
        assert state_of(client.app).ws_pending.total == 0


def test_all_websockets_together_are_bounded_too(tmp_path: Path) -> None:
    config = ServerConfig(token=TOKEN, data_dir=tmp_path, sampling=SamplingDefaults(max_new_tokens=200))
    with serving(config, FakeEngine(context_length=512, token_delay=0.02)) as client:
        state_of(client.app).ws_pending.limit = 1000
        with client.websocket_connect("/", headers=AUTH) as ws:
            ws.send_text("a slow first answer")
            ws.send_text("y" * 1200)
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    ws.receive_text()
        assert closed.value.code == 1013 and "retry later" in closed.value.reason


# -- browsers: Origin and Host ---------------------------------------------------------------------------


def loopback_client(tmp_path: Path, **config: object) -> TestClient:
    """A client of a loopback-bound server, reached as 127.0.0.1 (what a browser on this machine does)."""
    settings = ServerConfig(api_only=True, data_dir=tmp_path, **config)  # type: ignore[arg-type]
    return TestClient(create_app(settings, FakeEngine()), base_url="http://127.0.0.1:8000")


def test_a_websocket_from_a_page_of_another_site_is_refused_403(tmp_path: Path) -> None:
    with loopback_client(tmp_path) as client:
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/", headers={"Origin": "http://evil.example"}).__enter__()
        assert denied.value.status_code == 403 and denied.value.json()["error"]["param"] == "origin"
        # no browser, or this server's own page (the TestClient names the server so for WebSockets)
        for origin in ({}, {"Origin": "http://testserver"}):
            with client.websocket_connect("/", headers=origin) as ws:
                ws.send_text("hi [eos]")
                assert "hi" in json.loads(ws.receive_text())["response"]


def test_cors_origin_allows_that_sites_websockets_and_posts(tmp_path: Path) -> None:
    with loopback_client(tmp_path, cors_origins=("https://app.example",)) as client:
        with client.websocket_connect("/", headers={"Origin": "https://app.example"}) as ws:
            ws.send_text("hi [eos]")
            assert json.loads(ws.receive_text())["response"]
        assert client.post("/", content=b"hi", headers={"Origin": "https://app.example"}).status_code == 200
        error(client.post("/", content=b"hi", headers={"Origin": "https://other.example"}), 403, "origin")


def test_state_changing_requests_from_another_site_are_refused_and_reads_are_not(tmp_path: Path) -> None:
    with loopback_client(tmp_path) as client:
        evil = {"Origin": "http://evil.example"}
        error(client.post("/", content=b"hi", headers=evil), 403, "origin")
        error(client.post("/v1/chat/completions", json={}, headers=evil), 403, "origin")
        assert client.get("/v1/models", headers=evil).status_code == 200  # CORS keeps the reply unreadable
        assert client.post("/", content=b"hi").status_code == 200  # no Origin: not a browser


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1:8000"]
)
def test_a_loopback_server_refuses_host_names_of_other_sites(tmp_path: Path, host: str) -> None:
    with loopback_client(tmp_path) as client:
        message = error(client.get("/v1/models", headers={"Host": host}), 403, "host")
        assert "--allowed-hosts" in message
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/", headers={"Host": host}).__enter__()
        assert denied.value.status_code == 403


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"])
def test_loopback_host_names_are_served(tmp_path: Path, host: str) -> None:
    with loopback_client(tmp_path) as client:
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_adds_names_and_a_public_bind_checks_none(tmp_path: Path) -> None:
    with loopback_client(tmp_path, allowed_hosts=("llm.example",)) as client:
        assert client.get("/v1/models", headers={"Host": "llm.example:443"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "evil.example"}).status_code == 403
    with loopback_client(tmp_path, host="0.0.0.0") as client:
        assert client.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200


# -- wrong tokens --------------------------------------------------------------------------------------


def test_wrong_tokens_slow_that_client_down_and_never_a_right_token(client: TestClient) -> None:
    for _ in range(10):
        assert client.get("/v1/models", headers={"Authorization": "guess"}).status_code == 401
    started = time.monotonic()
    assert client.get("/v1/models", headers={"Authorization": "guess"}).status_code == 401
    assert time.monotonic() - started >= 0.9  # the eleventh wrong token waits out a 1 s back-off
    started = time.monotonic()
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert time.monotonic() - started < 0.5  # a right token is answered at once
    other = TestClient(client.app, client=("10.1.2.3", 5555))
    started = time.monotonic()
    assert other.get("/v1/models", headers={"Authorization": "guess"}).status_code == 401
    assert time.monotonic() - started < 0.5  # another client is not slowed down
    assert client.get("/v1/models").status_code == 401  # no token presented: nothing to slow down


async def test_the_back_off_doubles_is_capped_and_bounds_checks_under_way() -> None:
    now = [0.0]
    failures = FailedTokens(free=3, window=60, max_delay=4, max_held=2, clock=lambda: now[0])
    for _ in range(3):
        assert await failures.check("c", lambda: False) == 401  # free failures: no wait
    assert failures.delay("c") == 1.0
    failures.failed("c")
    assert failures.delay("c") == 2.0
    for _ in range(5):
        failures.failed("c")
    assert failures.delay("c") == 4.0  # capped
    failures.delay = lambda _: 0.2  # type: ignore[method-assign]  # keep the test quick
    held = [asyncio.create_task(failures.check("c", lambda: False)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert await failures.check("c", lambda: True) == 429  # both slots taken: not even checked
    assert await asyncio.gather(*held) == [401, 401]
    assert await failures.check("c", lambda: True) == 200  # a right token: at once
    assert await failures.check("someone else", lambda: False) == 401
    now[0] = 1000.0
    del failures.delay
    assert failures.delay("c") == 0.0  # the record expired after the window


def test_an_answer_ending_after_the_reader_closed_is_not_logged_as_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by bench/hostile.py: the reader closed a flooding connection (1008) while a message
    was being prepared; the answerer's reply then failed to send and was logged with a traceback."""

    async def closed_under_it(self: Connection) -> None:
        raise WebSocketDisconnected('Cannot call "send" once a close message has been sent.')

    monkeypatch.setattr(Connection, "_answer_in_order", closed_under_it)
    config = ServerConfig(token=TOKEN, data_dir=tmp_path)
    with (
        serving(config, FakeEngine()) as client,
        caplog.at_level(logging.ERROR),
        client.websocket_connect("/", headers=AUTH) as ws,
    ):
        ws.send_text("hi")
    assert not [r for r in caplog.records if "answerer failed" in r.getMessage()]
