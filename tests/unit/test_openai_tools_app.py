"""Tool calling on /v1/chat/completions over the fake engine, whose template has a tools section.

The fake engine answers "You said: <last user message>." — a user message holding a call makes
the answer hold it, so each test chooses what the "model" writes.
"""

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from easllm.config import SamplingDefaults
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import ModelInfo
from easllm.protocol.openai_tools import MAX_TOOLS
from easllm.rag.splitter import Chunk
from easllm.rag.store import Hit
from easllm.server.state import state_of
from tests.apps import start
from tests.tool_templates import HERMES_TEMPLATE

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
EOS = {"role": "system", "content": "[eos]"}  # the fake stops right after its echo


class ToolFake(FakeEngine):
    """The fake engine with a tools-aware template; `grammar` claims grammar-constrained decoding."""

    def __init__(self, features: frozenset[str] = frozenset()) -> None:
        super().__init__(context_length=2048, chat_template=HERMES_TEMPLATE)
        self.features = features

    def _load(self) -> ModelInfo:
        return replace(super()._load(), features=self.features)


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_HOME", str(tmp_path))


@pytest.fixture
def engine() -> ToolFake:
    return ToolFake()


@pytest.fixture
def client(engine: ToolFake) -> Iterator[TestClient]:
    with start(engine, api_only=True, sampling=SamplingDefaults(max_new_tokens=400)) as c:
        yield c


def post(client: TestClient, user: str = "hi", **fields: object):
    body = {"model": "m", "messages": [EOS, {"role": "user", "content": user}], "tools": [WEATHER, TIME]}
    body.update(fields)
    return client.post("/v1/chat/completions", json=body)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    items = [e for e in r.text.split("\n\n") if e]
    assert items[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in items[:-1]]


def test_a_call_becomes_tool_calls_with_finish_reason_tool_calls(
    client: TestClient, engine: ToolFake
) -> None:
    choice = ok(post(client, CALL))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "You said:"  # the text before the call stays in content
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Tokyo"}
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert (
        '"name": "get_weather", "description": "Weather of a city"' in prompt
    )  # the template shows the tools
    assert engine.requests[-1].sampling.grammar is None  # no grammar support: checked after the fact


def test_an_answer_without_a_call_is_content_with_finish_reason_stop(client: TestClient) -> None:
    choice = ok(post(client, "Weather in Tokyo?"))["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "You said: Weather in Tokyo?."


@pytest.mark.parametrize(
    "text",
    [
        CALL.replace("get_weather", "get_stock"),  # no such tool
        CALL.replace('"city"', '"town"'),  # arguments fail the schema
        CALL.replace('"Tokyo"}}', '"Tokyo"'),  # malformed JSON
    ],
)
def test_an_invalid_call_under_auto_is_returned_as_text(client: TestClient, text: str) -> None:
    choice = ok(post(client, text))["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == f"You said: {text}."


def test_parallel_calls_and_parallel_tool_calls_false(client: TestClient) -> None:
    two = CALL + "\n" + CALL.replace("Tokyo", "Paris")
    calls = ok(post(client, two))["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Tokyo", "Paris"]
    assert len({c["id"] for c in calls}) == 2
    calls = ok(post(client, two, parallel_tool_calls=False))["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1


def test_streaming_sends_the_head_of_each_call_then_its_arguments_in_pieces(client: TestClient) -> None:
    chunks = events(post(client, CALL, stream=True, stream_options={"include_usage": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "You said: "
    first_call = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
    assert all("tool_calls" not in d for d in deltas[:first_call]) and "content" not in deltas[-1]
    assert any(d.get("content") for d in deltas[:first_call])  # the content came before the call
    parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    head, rest = parts[0], parts[1:]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert len(rest) > 1 and all(set(p) == {"index", "function"} for p in rest)
    assert json.loads("".join(p["function"]["arguments"] for p in rest)) == {"city": "Tokyo"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and finishes.count("tool_calls") == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_streaming_an_invalid_call_sends_it_as_content(client: TestClient) -> None:
    text = CALL.replace("get_weather", "get_stock")
    chunks = events(post(client, text, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == f"You said: {text}."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_two_step_tool_loop_renders_the_call_and_the_result(client: TestClient, engine: ToolFake) -> None:
    first = ok(post(client, CALL))["choices"][0]["message"]
    call = first["tool_calls"][0]
    messages = [
        EOS,
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'},
    ]
    body = {"messages": messages, "tools": [WEATHER, TIME]}
    answer = ok(client.post("/v1/chat/completions", json=body))["choices"][0]
    assert answer["finish_reason"] == "stop"
    assert "<tool_response>" in answer["message"]["content"]  # the fake echoes the last user turn
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}' in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt


def test_tool_choice_none_shows_no_tools_and_makes_no_call(client: TestClient, engine: ToolFake) -> None:
    choice = ok(post(client, CALL, tool_choice="none"))["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert "get_time" not in engine.detokenize(engine.requests[-1].prompt_token_ids)


def test_legacy_functions_answer_with_function_call() -> None:
    with start(ToolFake(), api_only=True) as client:
        body = {
            "messages": [EOS, {"role": "user", "content": CALL}],
            "functions": [WEATHER["function"]],
            "function_call": "auto",
        }
        choice = ok(client.post("/v1/chat/completions", json=body))["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in choice["message"]


def test_required_and_named_constrain_the_answer_with_a_grammar() -> None:
    engine = ToolFake(frozenset({"grammar"}))
    with start(engine, api_only=True) as client:
        ok(post(client, CALL, tool_choice="required"))
        grammar = engine.requests[-1].sampling.grammar
        assert grammar is not None and grammar.startswith('root ::= ( "<tool_call>" space tool-call')
        assert "get_weather" in grammar and "get_time" in grammar
        named = {"type": "function", "function": {"name": "get_time"}}
        ok(post(client, "x", tool_choice=named))
        grammar = engine.requests[-1].sampling.grammar
        assert "get_time" in grammar and "get_weather" not in grammar
        r = post(client, "x", tool_choice="required", response_format={"type": "json_object"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_a_lazy_grammar_under_auto_where_the_engine_has_triggers() -> None:
    engine = ToolFake(frozenset({"grammar", "grammar_triggers"}))
    with start(engine, api_only=True) as client:
        ok(post(client, "x"))
    sampling = engine.requests[-1].sampling
    assert sampling.grammar is not None and sampling.grammar_triggers == ("<tool_call>",)


def test_knowledge_base_with_tools_puts_excerpts_in_the_system_part(
    client: TestClient, engine: ToolFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits = [Hit(Chunk("tokyo.md", "Tokyo is in Japan."), 0.9)]
    monkeypatch.setattr(state_of(client.app).chat.prompts, "retrieve", lambda question: hits)
    data = ok(post(client, CALL, knowledge_base=True))
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert data["sources"][0]["source"] == "tokyo.md"
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert prompt.index("Tokyo is in Japan.") < prompt.index("# Tools") < prompt.index("<|im_start|>user")


def test_models_lists_the_tool_features(client: TestClient) -> None:
    card = ok(client.get("/v1/models"))["data"][0]
    assert "tools" in card["features"] and "tool_choice_required" not in card["features"]
    assert card["tool_call_parser"] == "hermes"


def test_tools_on_a_template_without_tool_support_are_400() -> None:
    with start(FakeEngine(), api_only=True) as client:
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "does not support tools" in r.json()["error"]["message"]


def test_required_on_an_engine_without_grammar_is_400(client: TestClient) -> None:
    r = post(client, "x", tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def function(name: str = "f", **extra: object) -> dict:
    return {"type": "function", "function": {"name": name, **extra}}


BAD = [
    ({"tools": {"a": 1}}, "tools"),  # not a list
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [function("bad name!")]}, "tools"),
    ({"tools": [function(parameters=[1])]}, "tools"),  # parameters not a JSON-schema object
    ({"tools": [function(parameters={"type": "string"})]}, "tools"),
    ({"tools": [function(parameters={"type": "object", "properties": 3})]}, "tools"),
    ({"tools": [function(), function()]}, "tools"),  # the same name twice
    ({"tools": [function(f"f{i}") for i in range(MAX_TOOLS + 1)]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "absent"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": None, "functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ({"functions": [{"name": "f"}]}, "functions"),  # tools and functions together
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_tool_fields_are_400_naming_the_field(client: TestClient, fields: dict, param: str) -> None:
    r = post(client, "x", **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tool_messages_must_answer_an_earlier_call(client: TestClient) -> None:
    base = [{"role": "user", "content": "x"}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    cases = [
        [*base, {"role": "tool", "content": "3 pm"}],  # no tool_call_id
        [*base, {"role": "tool", "tool_call_id": "call_9", "content": "3 pm"}],  # no such call
        [
            *base,
            {"role": "tool", "tool_call_id": "call_1", "content": "3 pm"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],  # the call comes later
    ]
    for messages in cases:
        r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [TIME]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    good = [
        *base,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3 pm"},
    ]
    assert client.post("/v1/chat/completions", json={"messages": good, "tools": [TIME]}).status_code == 200


def test_a_tools_section_larger_than_the_context_is_400_naming_tools() -> None:
    engine = ToolFake()
    engine.context_length = 400
    big = function("big", description="d" * 1000)
    with start(engine, api_only=True) as client:
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": [big]}
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_content_and_a_call_in_the_last_delta_stream_content_first() -> None:
    import asyncio

    from easllm.chat.template import ChatTemplate
    from easllm.engine.types import FinishReason, TokenDelta
    from easllm.protocol.openai_replies import Envelope
    from easllm.server.routes.openai import chat_events
    from easllm.serving.tools import ChatTools
    from easllm.tools.session import tool_session
    from easllm.tools.types import Tool, ToolRequest

    request = ToolRequest((Tool("get_weather", "", WEATHER["function"]["parameters"]),))
    session = tool_session(request, ChatTemplate(HERMES_TEMPLATE), set(), "fake")
    assert session is not None

    async def deltas():
        yield 0, TokenDelta("r", "Checking. " + CALL, [1], FinishReason.STOP)

    async def run() -> list[dict]:
        env = Envelope.new("chatcmpl", "chat.completion.chunk", "m")
        return [c async for c in chat_events(env, deltas(), 1, 5, False, None, {}, ChatTools(session, False))]

    chunks = [c["choices"][0] for c in asyncio.run(run())[1:]]
    assert chunks[0]["delta"] == {"content": "Checking. "}
    assert chunks[1]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["finish_reason"] == "tool_calls" and chunks[-1]["delta"] == {}
