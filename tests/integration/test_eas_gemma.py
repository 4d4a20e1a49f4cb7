"""`easllm serve` with the bundled gemma3-270m on llama.cpp, talked to by real HTTP clients."""

import json
import shutil
import subprocess
import time
from collections.abc import Iterable
from itertools import pairwise

import pytest
import requests

from tests.servers import Server

pytestmark = pytest.mark.integration

PROMPT = "The Eiffel Tower is located in the city of"


def post(server: Server, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(server.url, json=body, headers=server.headers(), stream=stream, timeout=120)


def nul_chunks(response: requests.Response) -> list[dict]:
    return [json.loads(c) for c in response.iter_lines(chunk_size=8192, delimiter=b"\0") if c]


def test_string_request_with_curl(gemma: Server, tmp_path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    curl = shutil.which("curl")
    if curl is None:
        r = requests.post(gemma.url, data=PROMPT.encode(), headers=gemma.headers(), timeout=120)
        assert r.status_code == 200
        text = r.text
    else:
        out = subprocess.run(
            [
                curl,
                "-sS",
                "-f",
                gemma.url,
                "-H",
                f"Authorization: {gemma.token}",
                "--data-binary",
                f"@{prompt_file}",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
        text = out.stdout.decode()
    assert text.strip(), "a string request returns the generated text"
    assert not text.lstrip().startswith("{")


def test_json_request_with_history(gemma: Server) -> None:
    history = [["Hello", "Hi!"]]
    data = post(gemma, {"prompt": PROMPT, "history": history, "max_new_tokens": 8, "temperature": 0}).json()
    assert data["response"]
    assert data["history"] == [*history, [PROMPT, data["response"]]]
    assert data["finish_reason"] in ("stop", "length")
    assert 0 < data["usage"]["completion_tokens"] <= 8
    assert data["usage"]["prompt_tokens"] > 3


def test_greedy_answer_is_sensible_and_deterministic(gemma: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 6, "temperature": 0}
    first = post(gemma, body).json()["response"]
    assert "Paris" in first
    assert post(gemma, body).json()["response"] == first


def test_streaming_chunks_are_cumulative_and_end_with_usage(gemma: Server) -> None:
    r = post(
        gemma,
        {"prompt": PROMPT, "max_new_tokens": 12, "temperature": 0, "use_stream_chat": True},
        stream=True,
    )
    assert r.status_code == 200
    parts = nul_chunks(r)
    assert len(parts) >= 3
    texts = [p["response"] for p in parts]
    assert all(b.startswith(a) for a, b in pairwise(texts))
    assert parts[-1]["usage"]["completion_tokens"] == 12 and parts[-1]["finish_reason"] == "length"
    assert parts[-1]["history"] == [[PROMPT, texts[-1]]]
    whole = post(gemma, {"prompt": PROMPT, "max_new_tokens": 12, "temperature": 0}).json()["response"]
    assert texts[-1] == whole


def test_streaming_delta_mode(gemma: Server) -> None:
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 10,
        "temperature": 0,
        "use_stream_chat": True,
        "stream_format": "delta",
    }
    parts = nul_chunks(post(gemma, body, stream=True))
    joined = "".join(p["response"] for p in parts)
    assert len(parts) >= 3 and joined == parts[-1]["history"][-1][1]


def test_stop_string_cuts_the_answer(gemma: Server) -> None:
    body = {"prompt": "One, two, three, four,", "max_new_tokens": 16, "temperature": 0}
    full = post(gemma, body).json()["response"]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    data = post(gemma, {**body, "stop": [stop]}).json()
    assert data["finish_reason"] == "stop"
    assert stop not in data["response"] and full.startswith(data["response"])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "nope"}])
def test_missing_or_wrong_token(gemma: Server, headers: dict) -> None:
    r = requests.post(gemma.url, json={"prompt": "x"}, headers=headers, timeout=10)
    assert r.status_code == 401 and "error" in r.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "history": [["a"]]}, "history"),
        ({"prompt": "word " * 12000}, "prompt"),
        ({"prompt": "x" * 600_000}, "prompt"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
    ],
)
def test_bad_input_400(gemma: Server, body: dict, param: str) -> None:
    r = post(gemma, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_invalid_json_400(gemma: Server) -> None:
    headers = {**gemma.headers(), "Content-Type": "application/json"}
    r = requests.post(gemma.url, data=b"{not json", headers=headers, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_client_disconnect_aborts_generation(gemma: Server) -> None:
    before = gemma.health()["engine"]["aborted_total"]
    body = {"prompt": "Once upon a time", "max_new_tokens": 250, "use_stream_chat": True}
    r = post(gemma, body, stream=True)
    lines = r.iter_lines(delimiter=b"\0")
    next(lines)
    next(lines)
    r.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        engine = gemma.health()["engine"]
        if engine["aborted_total"] > before and engine["running"] == 0:
            break
        time.sleep(0.1)
    assert engine["aborted_total"] == before + 1 and engine["running"] == 0
    # and the server still answers
    assert post(gemma, {"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


def test_non_streaming_disconnect_aborts_too(gemma: Server) -> None:
    before = gemma.health()["engine"]["aborted_total"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            gemma.url,
            json={"prompt": "Once upon a time", "max_new_tokens": 250},
            headers=gemma.headers(),
            timeout=0.5,
        )
    deadline = time.monotonic() + 10
    while gemma.health()["engine"]["aborted_total"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gemma.health()["engine"]["aborted_total"] == before + 1


# -- the two clients of the source document, unchanged but for host and authorization --


def post_http_request(
    prompt: str,
    system_prompt: str,
    history: list,
    host: str,
    authorization: str,
    max_new_tokens: int = 2048,
    temperature: float = 0.95,
    top_k: int = 1,
    top_p: float = 0.8,
    langchain: bool = False,
    use_stream_chat: bool = False,
) -> requests.Response:
    headers = {"User-Agent": "Test Client", "Authorization": f"{authorization}"}
    if not history:
        history = [("San Francisco is a", "city located in the state of California in the United States.")]
    pload = {
        "prompt": prompt,
        "system_prompt": system_prompt,
        "top_k": top_k,
        "top_p": top_p,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "use_stream_chat": use_stream_chat,
        "history": history,
    }
    if langchain:
        pload["langchain"] = langchain
    return requests.post(host, headers=headers, json=pload, stream=use_stream_chat)


def get_response(response: requests.Response):
    data = json.loads(response.content)
    return data["response"], data["history"]


def get_streaming_response(response: requests.Response) -> Iterable:
    for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode("utf-8"))
            yield data["response"], data["history"]


def test_source_document_clients(gemma: Server) -> None:
    system_prompt = "Act like you are programmer with 5+ years of experience."
    r = post_http_request(
        "How can I get there?", system_prompt, [], gemma.url, gemma.token, max_new_tokens=16, top_k=4
    )
    output, history = get_response(r)
    assert output and history[-1] == ["How can I get there?", output] and len(history) == 2
    r = post_http_request(
        "How can I get there?",
        system_prompt,
        [],
        gemma.url,
        gemma.token,
        max_new_tokens=16,
        top_k=4,
        use_stream_chat=True,
    )
    updates = list(get_streaming_response(r))
    assert len(updates) >= 2
    assert updates[-1][1][-1] == ["How can I get there?", updates[-1][0]]
