"""The gateway's WebSocket relay: when the replica closes a socket, the client gets the replica's
own close code and reason (not a generic close), and the message before it."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import websocket
from fastapi import FastAPI, Request, WebSocket

from easllm.control.app import create_console_app
from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry
from easllm.control.routing import ReplicaState, ServiceRoute
from tests.browser import serve_in_thread

ADMIN = "admin-gateway-1"
TOKEN = "svc-gateway-1"


def closing_replica() -> FastAPI:
    """A stand-in replica: one message on a socket, then it closes it with its own code."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def socket(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("last words")
        await ws.close(4003, "the replica is done")

    return app


def test_the_replica_s_close_code_reaches_the_client(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    app = create_console_app(ConsoleConfig(state_dir=tmp_path, admin_token=ADMIN), registry)
    with serve_in_thread(closing_replica()) as replica_url, serve_in_thread(app) as console_url:
        port = int(replica_url.rsplit(":", 1)[1])
        state = ReplicaState(1, "echo", 1, port, "/dev/null", status="ready")
        app.state.console.routing.add(ServiceRoute("echo", TOKEN, 1, replicas=[state]))
        url = console_url.replace("http", "ws", 1) + "/api/predict/echo/ws"
        client = websocket.create_connection(url, header=[f"Authorization: {TOKEN}"], timeout=10)
        try:
            assert client.recv() == "last words"
            opcode, frame = client.recv_data(control_frame=True)
        finally:
            client.close()
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame[:2], "big") == 4003 and frame[2:] == b"the replica is done"
        deadline = time.monotonic() + 5  # the relay's own cleanup runs just after the close frame
        while state.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.outstanding == 0
    registry.close()


def echoing_replica() -> FastAPI:
    """A stand-in replica that tells which X-Forwarded-For headers it was sent."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/")
    async def predict(request: Request) -> dict[str, list[str]]:
        return {"forwarded": request.headers.getlist("x-forwarded-for")}

    @app.websocket("/ws")
    async def socket(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(",".join(ws.headers.getlist("x-forwarded-for")))
        await ws.close()

    return app


def test_replicas_get_the_client_s_address_from_the_gateway_only(tmp_path: Path) -> None:
    """Replicas limit per client address (abuse throttle, token lockout): through the gateway, HTTP
    and WebSocket alike carry the client's address as the gateway saw it, once: a header the client
    sent does not reach the replica beside it (here the client is on the loopback, which uvicorn
    trusts as a proxy, so the gateway itself takes its header as the address)."""
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    app = create_console_app(ConsoleConfig(state_dir=tmp_path, admin_token=ADMIN), registry)
    with serve_in_thread(echoing_replica()) as replica_url, serve_in_thread(app) as console_url:
        port = int(replica_url.rsplit(":", 1)[1])
        state = ReplicaState(1, "echo", 1, port, "/dev/null", status="ready")
        app.state.console.routing.add(ServiceRoute("echo", TOKEN, 1, replicas=[state]))
        predict = f"{console_url}/api/predict/echo"
        r = requests.post(predict, json={"prompt": "hi"}, headers={"Authorization": TOKEN}, timeout=10)
        assert r.status_code == 200 and r.json() == {"forwarded": ["127.0.0.1"]}
        claimed = {"Authorization": TOKEN, "X-Forwarded-For": "10.9.9.9"}
        r = requests.post(predict, json={"prompt": "hi"}, headers=claimed, timeout=10)
        assert r.status_code == 200 and r.json() == {"forwarded": ["10.9.9.9"]}  # one header, not two
        url = console_url.replace("http", "ws", 1) + "/api/predict/echo/ws"
        client = websocket.create_connection(url, header=[f"Authorization: {TOKEN}"], timeout=10)
        try:
            assert client.recv() == "127.0.0.1"
        finally:
            client.close()
    registry.close()
