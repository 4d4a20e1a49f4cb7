"""The OpenAI routes (/v1) over the fake engine, through FastAPI's TestClient."""

import base64
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from llama_cpp.llama_grammar import JSON_GBNF

from easllm.app import create_app
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import GenerationRequest, ModelInfo, TokenDelta, TokenLogprob
from easllm.server.state import state_of
from easllm.serving.prompts import Prepared, Source
from tests.apps import start

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FeaturedFake(FakeEngine):
    """The fake engine claiming every feature; each token gets a made-up log-probability."""

    def _load(self) -> ModelInfo:
        return replace(super()._load(), features=frozenset({"logprobs", "grammar", "penalties"}))

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        async with aclosing(super().generate(req)) as deltas:
            async for delta in deltas:
                if req.sampling.logprobs is not None and delta.token_ids:
                    top = {delta.text: -0.25, "x": -1.5, "y": -2.5, "z": -3.5}
                    delta.logprobs = [TokenLogprob(delta.text, -0.25, top)]
                yield delta


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_HOME", str(tmp_path))  # an empty knowledge base per test


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=512)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with start(engine, token=TOKEN, sampling=SamplingDefaults(max_new_tokens=8)) as c:
        yield c


@pytest.fixture
def featured() -> FeaturedFake:
    return FeaturedFake(context_length=512)


@pytest.fixture
def fclient(featured: FeaturedFake) -> Iterator[TestClient]:
    with start(featured, token=TOKEN, sampling=SamplingDefaults(max_new_tokens=8)) as c:
        yield c


def chat(client: TestClient, content: str = "hi [eos]", **fields: object) -> dict:
    body = {"model": "anything", "messages": [{"role": "user", "content": content}], **fields}
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def sse(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def assert_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


# -- models, auth, error shapes --


def test_models_lists_the_served_model(client: TestClient) -> None:
    data = client.get("/v1/models", headers=AUTH).json()
    assert data["object"] == "list" and len(data["data"]) == 1
    card = data["data"][0]
    assert card["id"] == "fake-model" and card["object"] == "model" and card["owned_by"] == "easllm"
    assert card["context_length"] == 512 and card["engine"] == "fake" and card["features"] == []
    assert isinstance(card["created"], int)
    assert client.get("/v1/models/fake-model", headers=AUTH).json()["id"] == "fake-model"
    assert_error(client.get("/v1/models/gpt-4o", headers=AUTH), 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "wrong"}, {"Authorization": "Bearer wrong"}])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
    ],
)
def test_missing_or_wrong_token_is_401(client: TestClient, engine: FakeEngine, headers, method, path) -> None:
    r = client.request(method, path, json={"messages": [{"role": "user", "content": "x"}]}, headers=headers)
    assert assert_error(r, 401)["type"] == "authentication_error"
    assert engine.requests == []


def test_raw_token_is_accepted_too(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"Authorization": TOKEN}).status_code == 200


def test_unknown_route_and_wrong_method_in_openai_shape(client: TestClient) -> None:
    assert assert_error(client.post("/v1/responses", json={}, headers=AUTH), 404)["type"] == "not_found_error"
    assert_error(client.get("/v1/chat/completions", headers=AUTH), 405)


def test_503_in_openai_shape_until_the_model_is_loaded() -> None:
    release = threading.Event()

    class SlowFake(FakeEngine):
        def _load(self) -> ModelInfo:
            release.wait(5)
            return super()._load()

    app = create_app(ServerConfig(), SlowFake())
    with TestClient(app) as client:
        try:
            assert_error(client.get("/v1/models"), 503)
            body = {"messages": [{"role": "user", "content": "x"}]}
            assert_error(client.post("/v1/chat/completions", json=body), 503)
            assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503)
        finally:
            release.set()


# -- chat completions --


def test_chat_reply_usage_and_stop_finish(client: TestClient, engine: FakeEngine) -> None:
    data = chat(client, "hello [eos]")
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "fake-model"
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": "You said: hello [eos].", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0 and choice["logprobs"] is None
    prompt = "<|im_start|>user\nhello [eos]<|im_end|>\n<|im_start|>assistant\n"
    assert engine.requests[-1].prompt_token_ids == engine.tokenize(prompt)
    assert data["usage"] == {
        "prompt_tokens": len(engine.tokenize(prompt)),
        "completion_tokens": 1,
        "total_tokens": len(engine.tokenize(prompt)) + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_chat_renders_system_developer_history_and_text_parts(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Really."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond [eos]"}]},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages}, headers=AUTH)
    assert r.json()["choices"][0]["message"]["content"] == "You said: second [eos]."
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system\nReally.")
    assert "<|im_start|>assistant\nok<|im_end|>" in prompt


def test_max_tokens_gives_length_finish_capped_by_the_server(client: TestClient, engine: FakeEngine) -> None:
    data = chat(client, "go", max_tokens=3)
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 3
    assert chat(client, "go", max_tokens=1, max_completion_tokens=2)["usage"]["completion_tokens"] == 2
    assert chat(client, "go", max_tokens=1000)["usage"]["completion_tokens"] == 8  # the server's limit


def test_max_tokens_is_capped_by_the_context() -> None:
    engine = FakeEngine(context_length=60)
    with start(engine) as client:
        data = chat(client, "go", max_tokens=50)
    prompt_tokens = data["usage"]["prompt_tokens"]
    assert engine.requests[-1].sampling.max_new_tokens == 60 - prompt_tokens


def test_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    chat(client, "go", temperature=0.5, top_p=0.9, top_k=40, seed=7, stop="zz", repetition_penalty=1.1)
    s = engine.requests[-1].sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.repetition_penalty) == (
        0.5,
        0.9,
        40,
        7,
        ("zz",),
        1.1,
    )
    assert s.grammar is None and s.logprobs is None
    chat(client, "go", top_k=-1)
    assert engine.requests[-1].sampling.top_k == 0


def test_stop_strings_cut_the_answer(client: TestClient) -> None:
    data = chat(client, "go", temperature=0, stop=[" gamma", "never"])
    assert data["choices"][0]["message"]["content"] == "You said: go. alpha beta"
    assert data["choices"][0]["finish_reason"] == "stop"


def test_n_choices_are_separate_requests_with_derived_seeds(client: TestClient, engine: FakeEngine) -> None:
    data = chat(client, "go", n=3, seed=10, temperature=0.9)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert sorted(r.sampling.seed for r in engine.requests[-3:]) == [10, 11, 12]
    texts = [c["message"]["content"] for c in data["choices"]]
    assert len(set(texts)) > 1, "different seeds shuffle the fake's words differently"
    assert data["usage"]["completion_tokens"] == 3 * 8
    assert data["usage"]["prompt_tokens"] == len(engine.requests[-1].prompt_token_ids)


def test_streamed_deltas_assemble_to_the_greedy_reply(client: TestClient) -> None:
    full = chat(client, "go", temperature=0)["choices"][0]["message"]["content"]
    body = {"messages": [{"role": "user", "content": "go"}], "temperature": 0, "stream": True}
    chunks = sse(client.post("/v1/chat/completions", json=body, headers=AUTH))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and "usage" not in chunks[0]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_include_usage_ends_with_a_usage_chunk(client: TestClient) -> None:
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 4,
    }
    chunks = sse(client.post("/v1/chat/completions", json=body, headers=AUTH))
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert last["usage"]["prompt_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streamed_n_choices_carry_their_index(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "go"}], "stream": True, "n": 2, "max_tokens": 3}
    chunks = sse(client.post("/v1/chat/completions", json=body, headers=AUTH))
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
        assert "".join(m["delta"].get("content", "") for m in mine).startswith("You said: go.")


def test_chat_on_a_model_without_template_is_400() -> None:
    with start(FakeEngine(chat_template=None)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert "chat template" in assert_error(r, 400, "messages")["message"]


@pytest.mark.parametrize("length", [600, 100_000])  # over the context; too long to be worth tokenizing
def test_context_overflow_is_400_on_messages(client: TestClient, engine: FakeEngine, length: int) -> None:
    r = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * length}]}, headers=AUTH
    )
    assert "context" in assert_error(r, 400, "messages")["message"]
    assert engine.requests == []


def test_penalties_grammar_and_logprobs_are_refused_where_the_engine_lacks_them(
    client: TestClient, engine: FakeEngine
) -> None:
    messages = [{"role": "user", "content": "x"}]
    for fields, param in [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -0.5}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ]:
        r = client.post("/v1/chat/completions", json={"messages": messages, **fields}, headers=AUTH)
        assert "fake" in assert_error(r, 400, param)["message"]
    assert engine.requests == []
    # zero penalties and a text format ask for nothing: accepted
    chat(client, presence_penalty=0, frequency_penalty=0.0, response_format={"type": "text"})


def test_penalties_reach_an_engine_that_has_them(fclient: TestClient, featured: FeaturedFake) -> None:
    chat(fclient, presence_penalty=0.5, frequency_penalty=-1.0)
    s = featured.requests[-1].sampling
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.0)


def test_response_format_becomes_a_grammar(fclient: TestClient, featured: FeaturedFake) -> None:
    chat(fclient, response_format={"type": "json_object"})
    assert featured.requests[-1].sampling.grammar == JSON_GBNF
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": True}}
    chat(fclient, response_format=fmt)
    grammar = featured.requests[-1].sampling.grammar
    assert grammar is not None and '"\\"city\\""' in grammar and '"\\"population\\""' in grammar
    assert "root ::=" in grammar


def test_chat_logprobs_with_top_alternatives(fclient: TestClient) -> None:
    data = chat(fclient, "go", logprobs=True, top_logprobs=2, max_tokens=3)
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and content[0]["token"] == "You said: go."
    assert content[1]["logprob"] == -0.25 and content[1]["bytes"] == list(content[1]["token"].encode())
    assert [t["token"] for t in content[1]["top_logprobs"]] == [content[1]["token"], "x"]
    plain = chat(fclient, "go", logprobs=True, max_tokens=2)["choices"][0]["logprobs"]["content"]
    assert plain[0]["top_logprobs"] == []


def test_streamed_chat_logprobs(fclient: TestClient) -> None:
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "stream": True,
        "logprobs": True,
        "max_tokens": 3,
    }
    chunks = sse(fclient.post("/v1/chat/completions", json=body, headers=AUTH))
    tokens = [
        t["token"]
        for c in chunks
        if c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(tokens) == 3 and tokens[0] == "You said: go."


def test_knowledge_base_flag_goes_through_the_chat_service(client: TestClient) -> None:
    seen = {}

    def prepare(conv, sampling, no_template=None, max_round=None, use_knowledge=False):
        seen.update(conv=conv, max_round=max_round, use_knowledge=use_knowledge)
        ids = state_of(client.app).engine.tokenize(f"<|im_start|>user\n{conv.prompt} [eos]<|im_end|>")
        return Prepared(GenerationRequest(ids, sampling), conv, [Source("a.txt", "Paris is in France.", 0.9)])

    state_of(client.app).chat.prompts.conversation = prepare  # type: ignore[method-assign]
    messages = [
        {"role": "system", "content": "Use the notes."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "Where is Paris?"},
    ]
    data = client.post(
        "/v1/chat/completions", json={"messages": messages, "langchain": True}, headers=AUTH
    ).json()
    assert seen["use_knowledge"] is True and seen["max_round"] == 1
    conv = seen["conv"]
    assert (conv.prompt, conv.system_prompt, conv.history) == (
        "Where is Paris?",
        "Use the notes.",
        (("q1", "a1"),),
    )
    assert data["sources"][0]["source"] == "a.txt"
    assert data["choices"][0]["message"]["content"] == "You said: Where is Paris? [eos]."
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "assistant", "content": "hi"}], "knowledge_base": True},
        headers=AUTH,
    )
    assert_error(r, 400, "messages")


def test_knowledge_base_flag_on_an_empty_knowledge_base_is_400(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "extra_body": None, "knowledge_base": True}
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert "knowledge base is empty" in assert_error(r, 400, "langchain")["message"]
    assert engine.requests == []


def test_unknown_and_no_effect_fields_are_accepted(client: TestClient) -> None:
    data = chat(client, user="u1", store=False, metadata={"a": "b"}, min_p=0.1, tool_choice="none")
    assert data["choices"][0]["finish_reason"] == "stop"


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
    ),
    ({"model": 3}, "model"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes please"}, "stream"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            }
        },
        "response_format",
    ),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT, ids=[p + str(i) for i, (_, p) in enumerate(BAD_CHAT)])
def test_bad_chat_fields_are_400_naming_the_field(
    fclient: TestClient, featured: FeaturedFake, fields: dict, param: str
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    r = fclient.post("/v1/chat/completions", json=body, headers=AUTH)
    assert assert_error(r, 400, param)["type"] == "invalid_request_error"
    assert featured.requests == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
@pytest.mark.parametrize("content", [b'{"messages": [', b"[1, 2]", b"\xff\xfe", b""])
def test_bodies_that_are_not_a_json_object_are_400(client: TestClient, path: str, content: bytes) -> None:
    r = client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 400, "body")


# -- completions --


def complete(client: TestClient, prompt: object = "Once [eos]", **fields: object) -> dict:
    r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, **fields}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_uses_the_raw_prompt(client: TestClient, engine: FakeEngine) -> None:
    data = complete(client, "Once [eos]")
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    (choice,) = data["choices"]
    assert choice == {"index": 0, "text": "You said: Once [eos].", "logprobs": None, "finish_reason": "stop"}
    assert engine.requests[-1].prompt_token_ids == engine.tokenize("Once [eos]")
    assert data["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 1,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_completion_works_on_a_model_without_chat_template() -> None:
    with start(FakeEngine(chat_template=None)) as client:
        assert complete(client, "base [eos]")["choices"][0]["text"] == "You said: base [eos]."


def test_completion_prompt_list_and_n(client: TestClient) -> None:
    data = complete(client, ["a [eos]", "bb [eos]"], n=2)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in data["choices"]] == ["You said: a [eos]."] * 2 + ["You said: bb [eos]."] * 2
    assert data["usage"]["prompt_tokens"] == 8 + 9  # each prompt counted once, BOS included


def test_completion_echo_and_max_tokens(client: TestClient) -> None:
    data = complete(client, "Say", echo=True, max_tokens=2, temperature=0)
    assert data["choices"][0]["text"] == "SayYou said: Say. alpha"
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 2


def test_streamed_completion_equals_the_reply(client: TestClient) -> None:
    full = complete(client, "Say", temperature=0, echo=True)["choices"][0]["text"]
    body = {
        "prompt": "Say",
        "temperature": 0,
        "echo": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = sse(client.post("/v1/completions", json=body, headers=AUTH))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_completion_logprobs(fclient: TestClient) -> None:
    data = complete(fclient, "Say", logprobs=2, max_tokens=3, temperature=0)
    lp = data["choices"][0]["logprobs"]
    assert lp["tokens"] == ["You said: Say.", " alpha", " beta"]
    assert lp["token_logprobs"] == [-0.25] * 3
    assert lp["text_offset"] == [0, 14, 20]
    assert lp["top_logprobs"][1][" alpha"] == -0.25
    body = {"prompt": "Say", "logprobs": 0, "max_tokens": 3, "temperature": 0, "stream": True}
    chunks = sse(fclient.post("/v1/completions", json=body, headers=AUTH))
    offsets = [
        o for c in chunks if c["choices"][0]["logprobs"] for o in c["choices"][0]["logprobs"]["text_offset"]
    ]
    assert offsets == [0, 14, 20]


BAD_COMPLETION = [
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"),
    ({"prompt": ["x"] * 8, "n": 9}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": 1, "echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"temperature": -1}, "temperature"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"logit_bias": {"1": 1}}, "logit_bias"),
    ({"echo": "maybe"}, "echo"),
]


@pytest.mark.parametrize(
    ("fields", "param"), BAD_COMPLETION, ids=[p + str(i) for i, (_, p) in enumerate(BAD_COMPLETION)]
)
def test_bad_completion_fields_are_400_naming_the_field(
    fclient: TestClient, featured: FeaturedFake, fields: dict, param: str
) -> None:
    r = fclient.post("/v1/completions", json={"prompt": "x", **fields}, headers=AUTH)
    assert_error(r, 400, param)
    assert featured.requests == []


def test_completion_logprobs_refused_without_the_feature(client: TestClient) -> None:
    assert (
        "fake"
        in assert_error(
            client.post("/v1/completions", json={"prompt": "x", "logprobs": 1}, headers=AUTH), 400, "logprobs"
        )["message"]
    )


@pytest.mark.parametrize("length", [600, 100_000])
def test_completion_prompt_over_the_context_is_400(client: TestClient, length: int) -> None:
    r = client.post("/v1/completions", json={"prompt": ["ok", "y" * length]}, headers=AUTH)
    assert "context" in assert_error(r, 400, "prompt")["message"]


# -- embeddings --


class WordEmbedder:
    """Deterministic unit vectors: one dimension per known word."""

    name = "word-embedder"
    dim = 4
    WORDS = ("cat", "dog", "car", "bus")

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def _embed(self, kind: str, texts) -> np.ndarray:
        self.calls.append((kind, list(texts)))
        rows = np.array([[float(w in t) for w in self.WORDS] for t in texts], dtype=np.float32) + 0.01
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def embed_queries(self, texts) -> np.ndarray:
        return self._embed("query", texts)

    def embed_passages(self, texts) -> np.ndarray:
        return self._embed("passage", texts)

    def count_tokens(self, texts, query: bool = False) -> int:
        return sum(len(t.split()) + 2 for t in texts)


class SharedWords:
    def __init__(self) -> None:
        self.embedder = WordEmbedder()

    def get(self) -> WordEmbedder:
        return self.embedder


@pytest.fixture
def words(client: TestClient) -> WordEmbedder:
    shared = SharedWords()
    state_of(client.app).embedder = shared
    return shared.embedder


def embed(client: TestClient, **fields: object) -> dict:
    r = client.post("/v1/embeddings", json={"model": "any", **fields}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_embeddings_of_a_string_and_a_list(client: TestClient, words: WordEmbedder) -> None:
    one = embed(client, input="a cat")
    assert one["object"] == "list" and one["model"] == "word-embedder"
    (row,) = one["data"]
    assert row["object"] == "embedding" and row["index"] == 0 and len(row["embedding"]) == 4
    assert row["embedding"][0] > 0.9
    assert one["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    many = embed(client, input=["a cat", "the red bus"])
    assert [d["index"] for d in many["data"]] == [0, 1] and many["data"][1]["embedding"][3] > 0.9
    assert many["usage"]["prompt_tokens"] == 4 + 5
    assert words.calls[-1] == ("passage", ["a cat", "the red bus"])


def test_embeddings_base64_and_query_type(client: TestClient, words: WordEmbedder) -> None:
    floats = embed(client, input="dog")["data"][0]["embedding"]
    packed = embed(client, input="dog", encoding_format="base64", input_type="query")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(packed), dtype="<f4")
    assert np.allclose(decoded, floats) and words.calls[-1][0] == "query"
    assert embed(client, input="dog", dimensions=4)["data"][0]["embedding"] == floats


BAD_EMBEDDING = [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["ok", "  "]}, "input"),
    ({"input": [101, 2023]}, "input"),
    ({"input": [[101, 2023]]}, "input"),
    ({"input": {"text": "x"}}, "input"),
    ({"input": ["x"] * 2049}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "dimensions": 2}, "dimensions"),
    ({"input": "x", "input_type": "document"}, "input_type"),
]


@pytest.mark.parametrize(
    ("fields", "param"), BAD_EMBEDDING, ids=[p + str(i) for i, (_, p) in enumerate(BAD_EMBEDDING)]
)
def test_bad_embedding_fields_are_400_naming_the_field(
    client: TestClient, words: WordEmbedder, fields: dict, param: str
) -> None:
    assert_error(client.post("/v1/embeddings", json=fields, headers=AUTH), 400, param)
    assert words.calls == []
