"""Hostile input, round 2 (issue 16), on a real `easllm serve --engine fake` over real sockets: the
issue's own probes (deep JSON, a negative seed, DNS rebinding, a cross-site WebSocket) and a body
that trickles in."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import requests
import websocket

from tests.servers import running_server

pytestmark = pytest.mark.integration
TOKEN = "hostile-real-token"


def test_the_issues_probes_on_a_real_server(tmp_path: Path) -> None:
    args = ["--engine", "fake", "--api-only", "--max-new-tokens", "4", "--data-dir", str(tmp_path / "d")]
    with running_server(args, tmp_path, token=None) as server:  # tokenless: the default, and the risky case
        deep = '{"prompt": "hi", "history": ' + "[" * 5000 + "]" * 5000 + "}"
        for path in ("/", "/v1/chat/completions"):
            r = requests.post(
                server.url + path, data=deep, headers={"Content-Type": "application/json"}, timeout=30
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
        r = requests.post(f"{server.url}/", json={"prompt": "hi", "seed": -1}, timeout=30)
        assert r.status_code == 200 and r.json()["response"]

        # DNS rebinding: a page of evil.example that resolves to 127.0.0.1
        r = requests.get(f"{server.url}/v1/models", headers={"Host": "evil.example"}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["param"] == "host"
        assert requests.get(f"{server.url}/v1/models", timeout=30).status_code == 200

        ws_url = server.url.replace("http", "ws", 1) + "/"
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(ws_url, origin="http://evil.example", timeout=30)
        assert refused.value.status_code == 403
        port = server.url.rsplit(":", 1)[1]
        ws = websocket.create_connection(ws_url, origin=f"http://127.0.0.1:{port}", timeout=30)
        ws.send("hello [eos]")
        assert json.loads(ws.recv())["response"]
        ws.close()


@pytest.mark.slow  # a minute of waiting; the same cut-off is tested in-process with a short timeout
def test_a_trickling_body_is_cut_off_with_408(tmp_path: Path) -> None:
    args = ["--engine", "fake", "--api-only", "--data-dir", str(tmp_path / "d")]
    with running_server(args, tmp_path, token=TOKEN) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            head = (
                f"POST / HTTP/1.1\r\nHost: {host}\r\nAuthorization: {TOKEN}\r\nContent-Length: 1000\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"prompt": ')
            started = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 55 <= time.monotonic() - started < 90  # the default --body-timeout is 60 s
