"""Limits and secrets on a real `easllm serve --engine fake` process, over real sockets: what
uvicorn adds (its WebSocket size cap, its log lines) and what only a real socket shows (a body
refused before it is all sent, connections held open by other clients)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
import websocket

from tests.servers import running_server

pytestmark = pytest.mark.integration
TOKEN = "real-sock-token-3e9b"


def test_limits_and_secrets_over_real_sockets(tmp_path: Path) -> None:
    args = ["--engine", "fake", "--api-only", "--max-new-tokens", "4", "--data-dir", str(tmp_path / "d")]
    args += ["--max-body-mb", "0.0625", "--max-connections", "3", "--log-level", "DEBUG"]  # 64 KB bodies
    with running_server(args, tmp_path, token=TOKEN) as server:
        ws_url = server.url.replace("http", "ws") + "/"
        auth = {"Authorization": TOKEN}

        # a body over the limit: 413 at once, before the client has sent it all
        r = requests.post(f"{server.url}/", data=b"x" * 200_000, headers=auth, timeout=30)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]
        chunked = requests.post(f"{server.url}/", data=iter([b"y" * 16384] * 8), headers=auth, timeout=30)
        assert chunked.status_code == 413 and chunked.json()["error"]["param"] == "body"

        # WebSocket: over the limit, an error in turn; over twice the limit, uvicorn closes (1009)
        ws = websocket.create_connection(f"{ws_url}?token={TOKEN}", timeout=30)
        ws.send(json.dumps({"prompt": "z" * 100_000}))
        refusal = json.loads(ws.recv())
        assert refusal["error"]["code"] == 413 and ws.recv() == "<EOS>"
        ws.send("hello [eos]")
        replies = []
        while (text := ws.recv()) != "<EOS>":
            replies.append(json.loads(text))
        assert replies[-1]["response"] == "You said: hello [eos]."
        ws.send("w" * 200_000)
        closed = (websocket.WebSocketConnectionClosedException, ConnectionResetError, BrokenPipeError)
        with pytest.raises(closed):  # the transport hangs up, before the route ever sees the message
            ws.recv()
            ws.recv()
        ws.close()

        # connections: three held open, a fourth is refused with 503 + Retry-After; probes still answer
        header = [f"Authorization: {TOKEN}"]
        held = [websocket.create_connection(ws_url, header=header, timeout=30) for _ in range(3)]
        r = requests.post(f"{server.url}/", data=b"hi", headers=auth, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "--max-connections" in r.json()["error"]["message"]
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(ws_url, header=header, timeout=30)
        assert refused.value.status_code == 503
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
        for ws in held:
            ws.close()
        deadline = time.monotonic() + 10
        while requests.post(f"{server.url}/", data=b"hi [eos]", headers=auth, timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the held connections were not released"
            time.sleep(0.1)

        with pytest.raises(websocket.WebSocketBadStatusException):  # refused, and not logged either
            websocket.create_connection(f"{ws_url}?token={TOKEN}-wrong", timeout=30)
        r = requests.get(f"{server.url}/v1/models?token={TOKEN}", headers=auth, timeout=10)
        assert r.status_code == 200
    log = server.log()
    assert "WebSocket /?token=***" in log  # uvicorn logged the handshakes, masked
    assert TOKEN not in log
