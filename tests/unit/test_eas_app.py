"""The EAS route over the fake engine, through FastAPI's TestClient."""

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import pytest
from fastapi.testclient import TestClient

from easllm.app import create_app
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from tests.apps import start

TOKEN = "s3cret"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=512)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with start(engine, token=TOKEN, sampling=SamplingDefaults(max_new_tokens=8)) as c:
        yield c


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": token}


def chunks(body: bytes) -> list[dict]:
    parts = body.split(b"\0")
    assert parts[-1] == b"", "every chunk ends with NUL"
    return [json.loads(p) for p in parts[:-1]]


def test_string_request_returns_plain_text(client: TestClient) -> None:
    r = client.post("/", content=b"Hello there", headers=auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("You said: Hello there.")


def test_json_request_appends_the_round_to_history(client: TestClient) -> None:
    body = {"prompt": "second [eos]", "history": [["first", "ok"]], "system_prompt": "Be nice"}
    r = client.post("/", json=body, headers=auth())
    data = r.json()
    assert r.status_code == 200
    assert data["response"] == "You said: second [eos]."
    assert data["history"] == [["first", "ok"], ["second [eos]", data["response"]]]
    assert data["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["completion_tokens"] == 1 and usage["total_tokens"] == usage["prompt_tokens"] + 1


def test_length_finish_and_server_cap_on_max_new_tokens(client: TestClient) -> None:
    data = client.post("/", json={"prompt": "go", "max_new_tokens": 1000}, headers=auth()).json()
    assert data["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 8


def test_bearer_token_is_accepted(client: TestClient) -> None:
    r = client.post("/", json={"prompt": "x [eos]"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_missing_or_wrong_token_is_401(client: TestClient, engine: FakeEngine, headers: dict) -> None:
    r = client.post("/", json={"prompt": "x"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert engine.requests == []


def test_open_service_needs_no_token(engine: FakeEngine) -> None:
    with start(engine) as client:
        assert client.post("/", content=b"hi [eos]").status_code == 200


def test_streaming_is_cumulative_nul_delimited_json(client: TestClient) -> None:
    r = client.post(
        "/", json={"prompt": "hey", "use_stream_chat": True, "history": [["a", "b"]]}, headers=auth()
    )
    assert r.status_code == 200
    parts = chunks(r.content)
    assert len(parts) >= 3
    responses = [p["response"] for p in parts]
    assert all(later.startswith(earlier) for earlier, later in pairwise(responses))
    assert all(p["history"][:-1] == [["a", "b"]] for p in parts)
    assert parts[-1]["history"][-1] == ["hey", responses[-1]]
    assert "usage" in parts[-1] and parts[-1]["finish_reason"] == "length"
    assert "usage" not in parts[0]


def test_streaming_delta_mode(client: TestClient) -> None:
    body = {"prompt": "hey", "use_stream_chat": "True", "stream_format": "delta", "temperature": 0}
    parts = chunks(client.post("/", json=body, headers=auth()).content)
    full = client.post("/", json={"prompt": "hey", "temperature": 0}, headers=auth()).json()["response"]
    assert "".join(p["response"] for p in parts) == full
    assert parts[-1]["history"][-1] == ["hey", full]


def test_stop_strings_end_the_answer_without_the_stop(client: TestClient) -> None:
    data = client.post(
        "/", json={"prompt": "go", "temperature": 0, "stop": [" gamma"]}, headers=auth()
    ).json()
    assert data["response"] == "You said: go. alpha beta" and data["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(client: TestClient) -> None:
    body = {"prompt": "go", "temperature": 0.7, "seed": 3}
    first = client.post("/", json=body, headers=auth()).json()["response"]
    assert client.post("/", json=body, headers=auth()).json()["response"] == first
    other = client.post("/", json={**body, "seed": 4}, headers=auth()).json()["response"]
    assert other != first


def test_do_sample_false_is_greedy(client: TestClient, engine: FakeEngine) -> None:
    client.post("/", json={"prompt": "go", "do_sample": False, "temperature": 0.9}, headers=auth())
    assert engine.requests[-1].sampling.temperature == 0.0


def test_defaults_come_from_the_server(engine: FakeEngine) -> None:
    defaults = SamplingDefaults(max_new_tokens=4, temperature=0.3, top_k=7, top_p=0.5)
    with start(engine, sampling=defaults) as client:
        client.post("/", json={"prompt": "go"})
    s = engine.requests[-1].sampling
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p) == (4, 0.3, 7, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"content": b'{"prompt": "x"', "headers": {"Content-Type": "application/json"}}, "body"),
        ({"content": b""}, "prompt"),
        ({"json": {"prompt": 3}}, "prompt"),
        ({"json": {"prompt": "x", "temperature": 5}}, "temperature"),
        ({"json": {"prompt": "x", "top_p": 0}}, "top_p"),
        ({"json": {"prompt": "x", "max_new_tokens": 0}}, "max_new_tokens"),
        ({"json": {"prompt": "x", "history": [["q"]]}}, "history"),
        ({"json": {"prompt": "", "system_prompt": "s"}}, "prompt"),
        ({"json": {"prompt": "y" * 600}}, "prompt"),
        ({"json": {"prompt": "x", "langchain": True}}, "langchain"),
    ],
)
def test_bad_input_is_400_naming_the_field(
    client: TestClient, engine: FakeEngine, kwargs: dict, param: str
) -> None:
    headers = {**auth(), **kwargs.pop("headers", {})}
    r = client.post("/", headers=headers, **kwargs)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert engine.requests == []
    assert client.post("/", json={"prompt": "still ok [eos]"}, headers=auth()).status_code == 200


def test_health_is_503_until_loaded() -> None:
    class SlowFake(FakeEngine):
        def _load(self):  # type: ignore[override]
            time.sleep(0.5)
            return super()._load()

    app = create_app(ServerConfig(), SlowFake())
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert client.post("/", content=b"hi").status_code == 503
        time.sleep(0.8)
        r = client.get("/health")
        assert r.status_code == 200 and r.json()["engine"]["ready"] is True


def test_queue_full_is_503_with_retry_after() -> None:
    engine = FakeEngine(token_delay=0.05, max_queue=1)
    with start(engine) as client:
        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(lambda _: client.post("/", json={"prompt": "x", "max_new_tokens": 10}), range(4))
            )
        codes = sorted(r.status_code for r in replies)
        assert codes[0] == 200 and codes[-1] == 503
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "queue" in busy.json()["error"]["message"]
        assert client.post("/", json={"prompt": "after [eos]"}).status_code == 200
