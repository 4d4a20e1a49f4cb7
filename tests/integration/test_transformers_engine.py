"""`--engine transformers` on a tiny random-weight model directory: streaming, stops, abort, errors."""

import json
import time

import pytest
import requests

from tests.servers import running_server
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(tmp / "tiny-llama")
    args = [
        "--engine",
        "transformers",
        "--model-path",
        str(model_dir),
        "--precision",
        "fp32",
        "--cpu",
        "--max-new-tokens",
        "400",
    ]
    with running_server(args, tmp, timeout=180) as server:
        yield server


def test_engine_and_template_come_from_the_directory(tiny_server) -> None:
    engine = tiny_server.health()["engine"]
    assert engine["engine"] == "transformers" and engine["model"] == "tiny-llama"


def test_streaming_and_history(tiny_server) -> None:
    body = {
        "prompt": "hello world",
        "history": [["the quick", "brown fox"]],
        "max_new_tokens": 12,
        "temperature": 0,
        "use_stream_chat": True,
    }
    r = requests.post(tiny_server.url, json=body, headers=tiny_server.headers(), stream=True, timeout=60)
    parts = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
    assert len(parts) >= 2
    last = parts[-1]
    assert last["usage"]["completion_tokens"] >= 1 and last["finish_reason"] in ("stop", "length")
    assert last["history"] == [["the quick", "brown fox"], ["hello world", last["response"]]]


def test_seeded_sampling_is_reproducible(tiny_server) -> None:
    body = {"prompt": "the lazy dog", "max_new_tokens": 10, "temperature": 1.0, "seed": 11}
    first = requests.post(tiny_server.url, json=body, headers=tiny_server.headers(), timeout=60).json()
    second = requests.post(tiny_server.url, json=body, headers=tiny_server.headers(), timeout=60).json()
    assert first["response"] == second["response"]


def test_disconnect_aborts(tiny_server) -> None:
    before = tiny_server.health()["engine"]["aborted_total"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            tiny_server.url,
            json={"prompt": "hello", "max_new_tokens": 400, "temperature": 0},
            headers=tiny_server.headers(),
            timeout=0.1,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and tiny_server.health()["engine"]["aborted_total"] == before:
        time.sleep(0.05)
    assert tiny_server.health()["engine"]["aborted_total"] == before + 1


def test_bad_input(tiny_server) -> None:
    r = requests.post(
        tiny_server.url, json={"prompt": "x", "top_p": 0}, headers=tiny_server.headers(), timeout=10
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
