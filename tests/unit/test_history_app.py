"""Every front end records its rounds: the fake engine behind FastAPI's TestClient, one export dir."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from easllm.chat.template import Conversation
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, Usage
from easllm.export.exporter import HistoryExporter
from easllm.export.record import conversation_from_messages
from easllm.rag.splitter import Chunk
from easllm.rag.store import Hit
from easllm.server.metrics import ServiceMetrics
from easllm.server.state import state_of
from easllm.serving.caller import Caller
from easllm.serving.observe import RoundObserver
from tests.apps import serving

TOKEN = "s3cret"
AUTH = {"Authorization": TOKEN}


@contextmanager
def start(tmp: Path, **config: Any) -> Iterator[TestClient]:
    settings: dict[str, Any] = {
        "token": TOKEN,
        "service_name": "svc",
        "data_dir": tmp / "data",
        "export_history_path": tmp / "export",
        "sampling": SamplingDefaults(max_new_tokens=8),
        **config,
    }
    with serving(ServerConfig(**settings), FakeEngine(context_length=1024)) as client:
        yield client


def records(export: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(export.glob("history-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def ws_answer(ws: Any, message: dict[str, Any]) -> dict[str, Any]:
    ws.send_text(json.dumps(message))
    last: dict[str, Any] = {}
    while (text := ws.receive_text()) != "<EOS>":
        last = json.loads(text)
    return last


def test_every_front_end_records_each_round_once_with_its_fields(tmp_path: Path) -> None:
    with start(tmp_path) as client:
        plain = client.post(
            "/",
            json={
                "prompt": "one",
                "history": [["q0", "a0"]],
                "system_prompt": "Be brief",
                "temperature": 0.5,
            },
            headers={**AUTH, "X-Request-Id": "req-plain"},
        )
        streamed = client.post("/", json={"prompt": "two", "use_stream_chat": True}, headers=AUTH)
        text = client.post("/", content=b"three [eos]", headers=AUTH)
        with client.websocket_connect("/", headers=AUTH) as ws:
            first_ws = ws_answer(ws, {"prompt": "four", "system_prompt": "Sys"})
            second_ws = ws_answer(ws, {"prompt": "five [eos]"})
        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [
                    {"role": "system", "content": "You help"},
                    {"role": "user", "content": "u1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "six"},
                ],
                "n": 2,
                "max_tokens": 5,
                "seed": 3,
            },
            headers=AUTH,
        )
        completion = client.post(
            "/v1/completions",
            json={"prompt": "seven", "max_tokens": 4, "stream": True},
            headers=AUTH,
        )
        for r in (plain, streamed, text, chat, completion):
            assert r.status_code == 200, r.text
    got = records(tmp_path / "export")  # the open period is exported at shutdown
    assert [(r["api"], r["prompt"]) for r in got] == [
        ("eas", "one"),
        ("eas", "two"),
        ("eas", "three [eos]"),
        ("websocket", "four"),
        ("websocket", "five [eos]"),
        ("openai.chat", "six"),
        ("openai.chat", "six"),
        ("openai.completions", "seven"),
    ]
    by_prompt = {r["prompt"]: r for r in got}
    one = by_prompt["one"]
    body = plain.json()
    assert one["response"] == body["response"] and one["usage"] == body["usage"]
    assert one["history"] == [["q0", "a0"]] and one["system_prompt"] == "Be brief"
    assert one["request_id"] == plain.headers["x-request-id"] == "req-plain"
    assert one["service"] == "svc" and one["model"] == "fake-model" and one["client"] == "testclient"
    assert one["parameters"]["temperature"] == 0.5 and one["parameters"]["max_new_tokens"] == 8
    assert one["finish_reason"] == "length" and one["session"] is None and one["sources"] == []
    assert 0 <= one["time_to_first_token"] <= one["latency"]
    assert one["time"].endswith("Z")
    final_chunk = json.loads(streamed.content.split(b"\0")[-2])
    assert by_prompt["two"]["response"] == final_chunk["response"]
    assert by_prompt["two"]["usage"] == final_chunk["usage"]
    assert by_prompt["three [eos]"]["response"] == text.text
    four, five = by_prompt["four"], by_prompt["five [eos]"]
    assert four["response"] == first_ws["response"] and four["system_prompt"] == "Sys"
    assert five["history"] == [["four", first_ws["response"]]] and five["finish_reason"] == "stop"
    assert five["response"] == second_ws["response"]
    assert four["session"] == five["session"] == four["request_id"] != one["request_id"]
    chats = [r for r in got if r["api"] == "openai.chat"]
    answers = [c["message"]["content"] for c in sorted(chat.json()["choices"], key=lambda c: c["index"])]
    assert sorted((r["choice"], r["response"]) for r in chats) == list(enumerate(answers))
    assert chats[0]["history"] == [["u1", "a1"]] and chats[0]["system_prompt"] == "You help"
    assert chats[0]["parameters"]["max_new_tokens"] == 5
    seven = by_prompt["seven"]
    streamed_text = "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in completion.text.splitlines()
        if line.startswith("data: {")
    )
    assert seven["response"] == streamed_text and seven["usage"]["completion_tokens"] == 4


def test_knowledge_base_sources_are_recorded(tmp_path: Path) -> None:
    hit = Hit(Chunk("manual.md", "The pump runs at 5 bar.", page=2, heading="Pump"), 0.87)
    with start(tmp_path) as client:
        state_of(client.app).chat.prompts.retrieve = lambda question: [hit]  # type: ignore[method-assign]
        r = client.post("/", json={"prompt": "pressure?", "langchain": True}, headers=AUTH)
        assert r.status_code == 200, r.text
    (record,) = records(tmp_path / "export")
    assert record["prompt"] == "pressure?"  # what the user asked, not the grounded prompt
    assert record["sources"] == [
        {
            "source": "manual.md",
            "content": "The pump runs at 5 bar.",
            "score": 0.87,
            "page": 2,
            "heading": "Pump",
        }
    ]


def test_requests_that_fail_before_answering_are_not_rounds(tmp_path: Path) -> None:
    with start(tmp_path) as client:
        assert client.post("/", json={"history": []}, headers=AUTH).status_code == 400
        assert client.post("/", json={"prompt": "x"}).status_code == 401
        assert client.post("/v1/chat/completions", json={"messages": []}, headers=AUTH).status_code == 400
    assert records(tmp_path / "export") == []


def test_an_unwritable_export_directory_does_not_break_serving(tmp_path: Path) -> None:
    blocked = tmp_path / "export"
    blocked.write_text("a file where the export directory should be")
    with start(tmp_path, export_interval=0.2) as client:
        for i in range(3):
            r = client.post("/", json={"prompt": f"q{i} [eos]"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["response"] == f"You said: q{i} [eos]."
        deadline = time.monotonic() + 10
        while "easllm_history_export_errors_total 0.0" in client.get("/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline, "the failed export is not reported"
            time.sleep(0.1)
        assert client.get("/ready").status_code == 200
    kept = b"".join(p.read_bytes() for p in (tmp_path / "data" / "history").glob("*.jsonl"))
    prompts = [json.loads(x)["prompt"] for x in kept.splitlines()]  # one file per period, in any order
    assert sorted(prompts) == ["q0 [eos]", "q1 [eos]", "q2 [eos]"]


def test_without_an_export_path_nothing_is_written(tmp_path: Path) -> None:
    with start(tmp_path, export_history_path=None) as client:
        assert client.post("/", json={"prompt": "hi [eos]"}, headers=AUTH).status_code == 200
        assert "easllm_history_records_total" not in client.get("/metrics", headers=AUTH).text
    assert not (tmp_path / "export").exists() and not (tmp_path / "data" / "history").exists()


# -- the hook itself, as the WebUI calls it (no HTTP request) --


async def deltas(
    texts: list[str], finish: FinishReason | None, fail: bool = False
) -> AsyncIterator[TokenDelta]:
    for i, t in enumerate(texts):
        yield TokenDelta("r", t, [100 + i])
    if fail:
        raise RuntimeError("decode failed")
    if finish is not None:
        yield TokenDelta("r", "", [], finish, Usage(3, len(texts)))


class Recorded(HistoryExporter):
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def record(self, line: bytes) -> None:
        self.lines.append(json.loads(line))


def observer() -> tuple[RoundObserver, Recorded]:
    engine = FakeEngine()
    history = Recorded()
    return RoundObserver("svc", engine, ServiceMetrics(engine), history), history


REQ = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=9))


async def test_a_stream_closed_early_is_recorded_as_aborted_with_its_partial_text() -> None:
    rounds, history = observer()
    watched = rounds.watch(
        deltas(["a", "b", "c"], FinishReason.STOP), "webui", Caller(session="s1"), "q", REQ
    )
    async with aclosing(watched) as stream:
        async for delta in stream:
            if delta.text == "b":
                break  # the user pressed Stop
    (record,) = history.lines
    assert record["finish_reason"] == "abort" and record["response"] == "ab"
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cached_tokens": 0}
    assert record["usage"] == usage
    assert record["session"] == "s1" and record["api"] == "webui" and record["client"] is None
    assert (
        rounds.metrics.registry.get_sample_value(
            "easllm_rounds_total", {"api": "webui", "finish_reason": "abort"}
        )
        == 1.0
    )


async def test_a_stream_that_fails_midway_is_recorded_as_error_and_still_raises() -> None:
    rounds, history = observer()
    conv = Conversation("q", "sys", (("u", "a"),))
    watched = rounds.watch(deltas(["x"], None, fail=True), "webui", Caller(client="10.0.0.7"), conv, REQ)
    with pytest.raises(RuntimeError, match="decode failed"):
        async for _ in watched:
            pass
    (record,) = history.lines
    assert record["finish_reason"] == "error" and record["response"] == "x"
    assert record["system_prompt"] == "sys" and record["history"] == [["u", "a"]]
    assert record["client"] == "10.0.0.7"


async def test_a_stream_that_yields_nothing_is_not_a_round() -> None:
    rounds, history = observer()

    async def refused() -> AsyncIterator[TokenDelta]:
        raise RuntimeError("queue full")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError):
        async for _ in rounds.watch(refused(), "eas", Caller(), "q", REQ):
            pass
    assert history.lines == []
    assert (
        rounds.metrics.registry.get_sample_value(
            "easllm_rounds_total", {"api": "eas", "finish_reason": "error"}
        )
        is None
    )


def test_conversation_from_messages_keeps_what_does_not_alternate() -> None:
    conv = conversation_from_messages(
        [
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "u1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
            {"role": "system", "content": "S2"},
            {"role": "user", "content": "last"},
        ]
    )
    assert conv == Conversation("last", "S1\n\nS2", (("u1", ""), ("u2", "a2")))
    assert conversation_from_messages([{"role": "assistant", "content": "hi"}]) == Conversation(
        "", "", (("", "hi"),)
    )
