"""Prefix caching with the chat model (Qwen2.5 0.5B, ChatML): a 4-round dialogue over EAS HTTP
(client-held history), the WebSocket (server-held history) and the OpenAI SDK finds each earlier
round cached and answers as a server started with --no-prefix-cache."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from itertools import pairwise

import openai
import pytest
import requests
import websocket

from tests.servers import Server, running_server

pytestmark = pytest.mark.integration

FLAGS = ["--threads", "2", "--ctx-size", "1024", "--max-batch", "2", "--max-new-tokens", "6"]
QUESTIONS = ["Name a fruit. One word.", "Name a colour. One word.", "Name an animal.", "Name a city."]
Rounds = list[tuple[str, int, int]]  # per round: answer, prompt tokens, cached tokens


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    with (
        running_server(FLAGS, tmp_path_factory.mktemp("cached")) as cached,
        running_server([*FLAGS, "--no-prefix-cache"], tmp_path_factory.mktemp("plain")) as plain,
    ):
        yield {"cached": cached, "plain": plain}


def eas_rounds(server: Server, system: str) -> Rounds:
    out, history = [], []
    for q in QUESTIONS:
        body = {"prompt": q, "history": history, "system_prompt": system, "temperature": 0}
        r = requests.post(server.url, json=body, headers=server.headers(), timeout=300)
        assert r.status_code == 200, r.text
        data = r.json()
        out.append((data["response"], data["usage"]["prompt_tokens"], data["usage"]["cached_tokens"]))
        history = data["history"]
    return out


def websocket_rounds(server: Server, system: str) -> Rounds:
    url = server.url.replace("http://", "ws://") + "/"
    ws = websocket.create_connection(url, header=[f"Authorization: {server.token}"], timeout=300)
    out = []
    try:
        for q in QUESTIONS:  # the server keeps the history
            ws.send(
                json.dumps({"prompt": q, "system_prompt": system, "temperature": 0, "use_stream_chat": False})
            )
            messages = []
            while (message := ws.recv()) != "<EOS>":
                messages.append(json.loads(message))
            usage = messages[-1]["usage"]
            out.append((messages[-1]["response"], usage["prompt_tokens"], usage["cached_tokens"]))
    finally:
        ws.close()
    return out


def openai_rounds(server: Server, system: str) -> Rounds:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, timeout=300)
    model = client.models.list().data[0].id
    messages: list = [{"role": "system", "content": system}]
    out = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=6)
        text, usage = reply.choices[0].message.content or "", reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        out.append((text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0))
        messages.append({"role": "assistant", "content": text})
    return out


@pytest.mark.parametrize(
    "api", [eas_rounds, websocket_rounds, openai_rounds], ids=["eas", "websocket", "openai"]
)
def test_each_round_finds_the_earlier_ones_cached_and_answers_as_without_the_cache(
    servers: dict[str, Server], api: Callable[[Server, str], Rounds]
) -> None:
    system = f"You are terse ({api.__name__})."  # its own first tokens: no other test's cache helps
    cached, plain = api(servers["cached"], system), api(servers["plain"], system)
    assert [text for text, _, _ in cached] == [text for text, _, _ in plain]
    assert all(hit == 0 for _, _, hit in plain)
    assert cached[0][2] < cached[0][1]
    for (_, previous_prompt, _), (_, prompt, hit) in pairwise(cached):
        assert previous_prompt < hit < prompt, cached  # the whole previous round and its answer
