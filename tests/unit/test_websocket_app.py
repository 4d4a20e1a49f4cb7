"""The WebSocket route over the fake engine, through Starlette's TestClient."""

import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.base import EngineOverloaded
from easllm.engine.types import TokenDelta
from easllm.errors import InvalidRequest
from easllm.server.routes.websocket import EOS, MAX_PENDING
from easllm.server.state import state_of
from easllm.serving.prompts import Prepared, Source
from tests.apps import serving

TOKEN = "s3cret"
AUTH = {"Authorization": TOKEN}


@contextmanager
def start(engine: FakeEngine, **config: object) -> Iterator[TestClient]:
    config = {"token": TOKEN, "sampling": SamplingDefaults(max_new_tokens=8), **config}
    with serving(ServerConfig(**config), engine) as client:  # type: ignore[arg-type]
        yield client


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=512)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with start(engine) as c:
        yield c


@pytest.fixture
def ws(client: TestClient) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect("/", headers=AUTH) as session:
        yield session


def answer(ws: WebSocketTestSession) -> list[dict]:
    """The JSON messages of one answer, up to and without its <EOS>."""
    messages = []
    while (text := ws.receive_text()) != EOS:
        messages.append(json.loads(text))
    return messages


def ask(ws: WebSocketTestSession, message: dict | str) -> list[dict]:
    ws.send_text(message if isinstance(message, str) else json.dumps(message))
    return answer(ws)


def final(ws: WebSocketTestSession, message: dict | str) -> dict:
    return ask(ws, message)[-1]


def prompt_text(engine: FakeEngine, index: int = -1) -> str:
    return engine.detokenize(engine.requests[index].prompt_token_ids)


# -- handshake --


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/", {}),
        ("/", {"Authorization": "wrong"}),
        ("/", {"Authorization": "Bearer wrong"}),
        ("/?token=wrong", {}),
        ("/?token=", {}),
    ],
)
def test_missing_or_wrong_token_refuses_the_handshake_with_401(
    client: TestClient, engine: FakeEngine, url: str, headers: dict
) -> None:
    with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect(url, headers=headers):
        pass
    assert refused.value.status_code == 401
    assert refused.value.json()["error"]["type"] == "authentication_error"
    assert engine.requests == []


@pytest.mark.parametrize(
    ("url", "headers"),
    [("/", {"Authorization": TOKEN}), ("/", {"Authorization": f"Bearer {TOKEN}"}), (f"/?token={TOKEN}", {})],
)
def test_raw_bearer_and_query_tokens_are_accepted(client: TestClient, url: str, headers: dict) -> None:
    with client.websocket_connect(url, headers=headers) as ws:
        assert final(ws, {"prompt": "hi [eos]"})["response"] == "You said: hi [eos]."


def test_open_service_needs_no_token(engine: FakeEngine) -> None:
    with start(engine, token=None) as client, client.websocket_connect("/") as ws:
        assert final(ws, {"prompt": "hi [eos]"})["finish_reason"] == "stop"


# -- streaming --


def test_streams_cumulative_chunks_then_eos(ws: WebSocketTestSession) -> None:
    chunks = ask(ws, {"prompt": "hey"})
    responses = [c["response"] for c in chunks]
    assert len(chunks) >= 3
    assert all(later.startswith(earlier) for earlier, later in pairwise(responses))
    assert all(c["history"] == [["hey", c["response"]]] for c in chunks)
    assert "usage" not in chunks[0] and "finish_reason" not in chunks[0]
    last = chunks[-1]
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 8


def test_delta_mode_concatenates_to_the_whole_answer(ws: WebSocketTestSession) -> None:
    chunks = ask(ws, {"prompt": "hey", "stream_format": "delta", "temperature": 0})
    whole = chunks[-1]["history"][-1][1]
    assert "".join(c["response"] for c in chunks) == whole
    assert whole.startswith("You said: hey. alpha")
    assert chunks[0]["response"] == "You said: hey." and chunks[1]["response"] == " alpha"


def test_not_streaming_sends_one_message_per_answer(ws: WebSocketTestSession) -> None:
    first = ask(ws, {"prompt": "one", "use_stream_chat": "False"})
    assert len(first) == 1
    assert first[0]["finish_reason"] == "length" and first[0]["usage"]["completion_tokens"] == 8
    assert first[0]["history"] == [["one", first[0]["response"]]]
    second = ask(ws, {"prompt": "two"})  # the setting stays in force
    assert len(second) == 1 and second[0]["response"].startswith("You said: two.")
    assert len(ask(ws, {"prompt": "three", "use_stream_chat": True})) > 1


def test_plain_text_message_is_a_prompt(ws: WebSocketTestSession) -> None:
    chunks = ask(ws, "Show me a golang example [eos]")
    assert chunks[-1]["response"] == "You said: Show me a golang example [eos]."
    assert chunks[-1]["history"] == [["Show me a golang example [eos]", chunks[-1]["response"]]]


def test_binary_json_message_is_a_request(ws: WebSocketTestSession) -> None:
    ws.send_bytes(json.dumps({"prompt": "こんにちは [eos]", "use_stream_chat": False}).encode())
    (only,) = answer(ws)
    assert only["response"] == "You said: こんにちは [eos]."


# -- the dialogue --


def test_each_round_is_kept_for_the_next(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    one = final(ws, {"prompt": "first [eos]"})
    two = final(ws, {"prompt": "second [eos]"})
    assert one["history"] == [["first [eos]", "You said: first [eos]."]]
    assert two["history"] == [
        ["first [eos]", "You said: first [eos]."],
        ["second [eos]", "You said: second [eos]."],
    ]
    assert "<|im_start|>user\nfirst [eos]<|im_end|>\n<|im_start|>assistant\nYou said: first" in prompt_text(
        engine
    )


def test_history_field_replaces_the_dialogue(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    final(ws, {"prompt": "forgotten [eos]"})
    replaced = final(ws, {"prompt": "now [eos]", "history": [["q", "a"]]})
    assert replaced["history"] == [["q", "a"], ["now [eos]", "You said: now [eos]."]]
    assert "forgotten" not in prompt_text(engine)
    cleared = final(ws, {"prompt": "fresh [eos]", "history": []})
    assert cleared["history"] == [["fresh [eos]", "You said: fresh [eos]."]]
    assert "now [eos]" not in prompt_text(engine)


def test_only_the_last_max_round_rounds_are_kept(engine: FakeEngine) -> None:
    with start(engine, max_round=2) as client, client.websocket_connect("/", headers=AUTH) as ws:
        for i in range(3):
            final(ws, {"prompt": f"round {i} [eos]"})
        last = final(ws, {"prompt": "round 3 [eos]"})
    assert [q for q, _ in last["history"]] == ["round 1 [eos]", "round 2 [eos]", "round 3 [eos]"]
    assert "round 0" not in prompt_text(engine)


def test_system_prompt_and_sampling_stay_in_force(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    final(
        ws,
        {
            "prompt": "one [eos]",
            "system_prompt": "Be brief",
            "temperature": 0.3,
            "top_k ": 5,
            "top_p": 0.5,
            "max_new_tokens ": 3,
            "repetition_penalty": 1.2,
            "stop": ["zeta"],
            "seed": 7,
        },
    )
    final(ws, {"prompt": "two [eos]"})
    s = engine.requests[-1].sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (0.3, 5, 0.5, 3)
    assert (s.repetition_penalty, s.stop, s.seed) == (1.2, ("zeta",), 7)
    assert prompt_text(engine).startswith("<|im_start|>system\nBe brief<|im_end|>")
    final(ws, {"prompt": "three [eos]", "system_prompt": "", "do_sample": False})
    assert "system" not in prompt_text(engine) and engine.requests[-1].sampling.temperature == 0.0
    final(ws, {"prompt": "four [eos]"})
    assert engine.requests[-1].sampling.temperature == 0.0 and engine.requests[-1].sampling.top_k == 5


def test_no_template_stays_in_force(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    final(ws, {"prompt": "raw one [eos]", "no_template": True})
    final(ws, {"prompt": "raw two [eos]"})
    assert prompt_text(engine) == "raw two [eos]"


def test_langchain_is_per_message(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    error = final(ws, {"prompt": "What is MNN?", "langchain": True})
    assert error["error"]["param"] == "langchain"
    assert final(ws, {"prompt": "plain [eos]"})["response"] == "You said: plain [eos]."


# -- ordering and concurrency --


def test_back_to_back_messages_are_answered_in_order() -> None:
    engine = FakeEngine(context_length=512, token_delay=0.01)
    with start(engine) as client, client.websocket_connect("/", headers=AUTH) as ws:
        prompts = ["first", "second", "third"]
        for p in prompts:
            ws.send_text(json.dumps({"prompt": p, "max_new_tokens": 4}))
        answers = [answer(ws) for _ in prompts]
    finals = [a[-1] for a in answers]
    assert [f["history"][-1][0] for f in finals] == prompts
    assert all(c["history"][-1][0] == p for a, p in zip(answers, prompts, strict=True) for c in a)
    assert [q for q, _ in finals[2]["history"]] == prompts
    assert finals[2]["history"][:2] == [finals[0]["history"][0], finals[1]["history"][1]]


def test_connections_keep_their_own_dialogues(client: TestClient, engine: FakeEngine) -> None:
    def converse(name: str) -> list[list[str]]:
        with client.websocket_connect("/", headers=AUTH) as ws:
            final(ws, {"prompt": f"{name} one [eos]", "system_prompt": name})
            return final(ws, {"prompt": f"{name} two [eos]"})["history"]

    names = [f"user{i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        histories = list(pool.map(converse, names))
    for name, history in zip(names, histories, strict=True):
        assert [q for q, _ in history] == [f"{name} one [eos]", f"{name} two [eos]"]
    assert len(engine.requests) == 8


@pytest.mark.parametrize("streaming", [True, False])
def test_disconnect_mid_answer_aborts_the_generation(streaming: bool) -> None:
    engine = FakeEngine(context_length=512, token_delay=0.02)
    with start(engine, sampling=SamplingDefaults(max_new_tokens=500)) as client:
        with client.websocket_connect("/", headers=AUTH) as ws:
            ws.send_text(json.dumps({"prompt": "long", "use_stream_chat": streaming}))
            if streaming:
                json.loads(ws.receive_text())
                json.loads(ws.receive_text())
            else:  # nothing is sent before the end: only the reader can see the client go
                while not engine.health().running:
                    time.sleep(0.01)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            health = engine.health()
            if health.aborted_total and not health.running:
                break
            time.sleep(0.02)
        assert (health.aborted_total, health.running, health.finished_total) == (1, 0, 0)


def test_too_many_waiting_messages_close_the_connection_with_1008() -> None:
    engine = FakeEngine(context_length=512, token_delay=0.02)
    with start(engine, sampling=SamplingDefaults(max_new_tokens=500)) as client:
        with client.websocket_connect("/", headers=AUTH) as ws:
            for i in range(MAX_PENDING + 2):
                ws.send_text(f"message {i}")
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    ws.receive_text()
        assert closed.value.code == 1008 and str(MAX_PENDING) in closed.value.reason
        deadline = time.monotonic() + 5
        while engine.health().running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.health().running == 0 and engine.health().aborted_total == 1


# -- errors --


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ('{"prompt": "x"', "body"),
        (b"\xff\xfe", "body"),
        ("", "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "history": [["q"]]}, "history"),
        ({"prompt": "x", "stream_format": "lines"}, "stream_format"),
        ({"prompt": "y" * 600}, "prompt"),
        ({"system_prompt": "s"}, "prompt"),
    ],
)
def test_bad_message_gets_an_error_then_eos_and_the_connection_stays(
    ws: WebSocketTestSession, engine: FakeEngine, message: dict | str | bytes, param: str
) -> None:
    if isinstance(message, bytes):
        ws.send_bytes(message)
        (error,) = answer(ws)
    else:
        (error,) = ask(ws, message if isinstance(message, str) else json.dumps(message))
    assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == 400 and error["error"]["message"]
    assert engine.requests == []
    assert final(ws, {"prompt": "still ok [eos]"})["response"] == "You said: still ok [eos]."


def test_a_message_without_prompt_still_sets_the_dialogue(
    ws: WebSocketTestSession, engine: FakeEngine
) -> None:
    # The source's multi-round sample sends {"system_prompt": ...} alone first.
    (error,) = ask(ws, {"system_prompt": "Act like a programmer.", "history": [["q", "a"]], "temperature": 0})
    assert error["error"]["param"] == "prompt"
    done = final(ws, {"prompt": "Sort in Python [eos]"})
    assert done["history"] == [["q", "a"], ["Sort in Python [eos]", "You said: Sort in Python [eos]."]]
    assert prompt_text(engine).startswith("<|im_start|>system\nAct like a programmer.<|im_end|>")
    assert engine.requests[-1].sampling.temperature == 0.0


def test_an_invalid_message_changes_nothing(ws: WebSocketTestSession, engine: FakeEngine) -> None:
    (error,) = ask(ws, {"prompt": "x", "system_prompt": "S", "temperature": 9})
    assert error["error"]["param"] == "temperature"
    final(ws, {"prompt": "y [eos]"})
    assert "system" not in prompt_text(engine)


def test_engine_overload_is_a_503_error_message(client: TestClient, ws: WebSocketTestSession) -> None:
    chat = state_of(client.app).chat

    async def overloaded(_req: object) -> AsyncIterator[TokenDelta]:
        raise EngineOverloaded("the engine queue is full")
        yield  # pragma: no cover

    real_engine = chat.engine
    chat.engine = SimpleNamespace(generate=overloaded)  # type: ignore[assignment]
    try:
        (error,) = ask(ws, {"prompt": "x"})
    finally:
        chat.engine = real_engine
    assert error["error"]["code"] == 503 and "queue" in error["error"]["message"]
    assert final(ws, {"prompt": "after [eos]"})["response"] == "You said: after [eos]."


def test_langchain_goes_through_the_knowledge_path_and_returns_sources(
    client: TestClient, ws: WebSocketTestSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = state_of(client.app).chat.prompts
    real_prepare = prompts.conversation
    calls: list[bool] = []

    def prepare(conv, sampling, no_template=None, max_round=None, use_knowledge=False):  # type: ignore[no-untyped-def]
        calls.append(use_knowledge)
        if use_knowledge and conv.prompt == "unknown":
            raise InvalidRequest("the knowledge base is empty", "langchain")
        prepared = real_prepare(conv, sampling, no_template, max_round)
        sources = [Source("mnn.md", "MNN is a deep learning framework.", 0.9)] if use_knowledge else []
        return Prepared(prepared.request, conv, sources)

    monkeypatch.setattr(prompts, "conversation", prepare)
    streamed = ask(ws, {"prompt": "What is MNN? [eos]", "langchain": True})
    assert len(streamed) >= 2 and all("sources" not in c for c in streamed[:-1])
    assert streamed[-1]["sources"] == [
        {
            "source": "mnn.md",
            "content": "MNN is a deep learning framework.",
            "score": 0.9,
            "page": None,
            "heading": None,
        }
    ]
    (whole,) = ask(ws, {"prompt": "Again? [eos]", "langchain": True, "use_stream_chat": False})
    assert whole["sources"][0]["source"] == "mnn.md" and whole["finish_reason"] == "stop"
    assert "sources" not in final(ws, {"prompt": "plain [eos]"})
    (error,) = ask(ws, {"prompt": "unknown", "langchain": True})
    assert error["error"]["param"] == "langchain"
    assert calls == [True, True, False, True]
