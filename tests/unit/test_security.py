"""Security properties of a service and of the console, in-process:

- every route (walked from `app.routes`, so a new route is covered the day it is added) refuses a
  request without the token, or a wrong one; only the probes are open;
- the console's admin API and each service's gateway route take different tokens;
- every token comparison is constant-time (`hmac.compare_digest`);
- tokens never reach the logs, not even from a `?token=` in a URL;
- CORS is closed by default and opened per origin with `--cors-origin`;
- the chat template (untrusted: GGUF files carry their own) runs in a bounded sandbox.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount, WebSocketRoute
from starlette.testclient import WebSocketDenialResponse

from easllm.config import SamplingDefaults, ServerConfig
from easllm.control.app import create_console_app
from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry
from easllm.control.spec import parse_spec
from easllm.engine.backends.fake import FakeEngine
from easllm.logs import RedactSecrets
from easllm.server.lockout import FailedTokens
from easllm.server.routes.websocket import EOS
from easllm.server.state import state_of
from tests.apps import serving
from tests.unit.test_webui_app import LOCKED as WEBUI_LOCKED

TOKEN = "sec-token-7f3a"
ADMIN = "admin-token-91c2"
SERVICE_TOKEN = "svc-token-55d0"
PROBES = {"/live", "/health", "/ready"}
# Open on purpose: GET / only redirects browsers to the WebUI's login page (405 for API clients).
OPEN = {("GET", "/")}
WRONG = [{}, {"Authorization": "wrong"}, {"Authorization": f"Bearer {TOKEN}-"}, {"Authorization": ""}]


@contextmanager
def start(engine: FakeEngine | None = None, **config: Any) -> Iterator[TestClient]:
    settings: dict[str, Any] = {"token": TOKEN, "sampling": SamplingDefaults(max_new_tokens=4), **config}
    with serving(ServerConfig(**settings), engine or FakeEngine(context_length=512)) as client:
        yield client


def routes(app: FastAPI) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(method, path) of HTTP routes, WebSocket paths, mount paths: what `app.routes` holds."""
    http, sockets, mounts = [], [], []
    for context in iter_route_contexts(app.routes):
        route = context.route
        if isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            sockets.append(context.path)
        elif isinstance(route, Mount):
            mounts.append(context.path)
        else:
            http += [(m, context.path) for m in sorted(context.methods or ()) if m != "HEAD"]
    return http, sockets, mounts


def concrete(path: str) -> str:
    return path.replace("{model_id:path}", "m").replace("{name}", "n").replace("{model_id}", "m")


# -- the token on every route ------------------------------------------------------------------------


def test_every_service_route_but_the_probes_refuses_without_the_token(tmp_path: Path) -> None:
    with start(data_dir=tmp_path) as client:
        state_of(client.app).failed_tokens = FailedTokens(free=10**6)  # no back-off
        http, sockets, mounts = routes(client.app)  # type: ignore[arg-type]
        paths = {p for _, p in http}
        assert {"/", "/metrics", "/openapi.json", "/v1/chat/completions", "/v1/knowledge/files"} <= paths
        assert sockets == ["/"] and mounts == ["/webui"]
        assert paths >= PROBES and set(http) >= OPEN  # the exceptions name routes that exist
        checked = 0
        for method, path in http:
            if path in PROBES or (method, path) in OPEN:
                continue
            for headers in WRONG:
                r = client.request(method, concrete(path), headers=headers, content=b"{}")
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
                checked += 1
            r = client.request(method, concrete(path), headers={"Authorization": TOKEN}, content=b"{}")
            assert r.status_code != 401, (method, path)  # the right token opens it
        assert checked >= 4 * 12
        for path in sockets:
            for headers in WRONG:
                with pytest.raises(WebSocketDenialResponse) as denied:
                    client.websocket_connect(path, headers=headers).__enter__()
                assert denied.value.status_code == 401
        for method, path in WEBUI_LOCKED:  # the WebUI: nothing but its login page without a session
            assert client.request(method, path).status_code == 401, path
        for probe in PROBES:
            assert client.get(probe).status_code == 200


def test_metrics_public_opens_metrics_and_nothing_else(tmp_path: Path) -> None:
    with start(data_dir=tmp_path, api_only=True, metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/v1/models").status_code == 401


@pytest.fixture
def console(tmp_path: Path) -> Iterator[TestClient]:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    registry.create_service(parse_spec({"name": "parked", "engine": "fake", "token": SERVICE_TOKEN}))
    registry.set_version_status("parked", 1, "active")
    registry.update_service("parked", desired="stopped", status="stopped")
    config = ConsoleConfig(state_dir=tmp_path, port=18998, admin_token=ADMIN)
    app = create_console_app(config, registry)
    app.state.failed_tokens = FailedTokens(free=10**6)  # these tests send hundreds of wrong tokens
    with TestClient(app) as client:
        yield client
    registry.close()


def test_every_console_route_takes_its_own_token_and_only_its_own(console: TestClient) -> None:
    http, sockets, _ = routes(console.app)  # type: ignore[arg-type]
    open_routes = {("GET", "/"), ("GET", "/health")}  # the static page (asks for the token) and the probe
    assert open_routes <= set(http)
    gateway = [(m, p) for m, p in http if p.startswith("/api/predict")]
    admin = [(m, p) for m, p in http if (m, p) not in open_routes and (m, p) not in gateway]
    assert len(admin) >= 12 and gateway and ("GET", "/openapi.json") in admin
    service_path = lambda p: p.replace("{service}", "parked").replace("{path:path}", "v1/models")  # noqa: E731
    for method, path in admin:
        url = service_path(path).replace("{name}", "parked")
        for headers in [
            *WRONG,
            {"Authorization": SERVICE_TOKEN},
            {"Authorization": f"Bearer {SERVICE_TOKEN}"},
        ]:
            r = console.request(method, url, headers=headers)
            assert r.status_code == 401, (method, path, headers)  # a service token is not an admin token
    for method, path in gateway:
        url = service_path(path)
        for headers in [*WRONG, {"Authorization": ADMIN}, {"Authorization": f"Bearer {ADMIN}"}]:
            r = console.request(method, url, headers=headers)
            assert r.status_code == 401, (method, path, headers)  # the admin token opens no service
        r = console.request(method, url, headers={"Authorization": SERVICE_TOKEN})
        assert r.status_code == 503  # past the door: the service is stopped
    assert sockets
    for path in sockets:
        for headers in [{}, {"Authorization": ADMIN}, {"Authorization": SERVICE_TOKEN}]:
            with pytest.raises(WebSocketDenialResponse) as denied:
                console.websocket_connect(service_path(path), headers=headers).__enter__()
            assert denied.value.status_code == (503 if headers.get("Authorization") == SERVICE_TOKEN else 401)
    assert console.get("/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


# -- constant-time comparison --------------------------------------------------------------------------


def test_every_token_check_is_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes)  # never str: no early exit on non-ASCII
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with start(data_dir=tmp_path, api_only=True) as client:
        for headers in ({"Authorization": "wrongish"}, {"Authorization": f"Bearer {TOKEN}"}):
            before = len(calls)
            client.get("/v1/models", headers=headers)
            assert len(calls) > before and calls[-1][1] == TOKEN.encode()
        before = len(calls)
        with client.websocket_connect(f"/?token={TOKEN}") as ws:
            ws.send_text("hi [eos]")
            while ws.receive_text() != EOS:
                pass
        assert len(calls) > before
        assert client.get("/v1/models", headers={"Authorization": "tökén".encode()}).status_code == 401
    from easllm.webui.app import token_checker

    before = len(calls)
    assert token_checker(TOKEN)("anyone", TOKEN) and not token_checker(TOKEN)("anyone", "ünïcode")
    assert len(calls) == before + 2


def test_console_and_gateway_checks_are_constant_time(
    console: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bytes] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append(b) or real(a, b))
    console.get("/api/services", headers={"Authorization": "x"})
    console.get("/api/predict/parked/v1/models", headers={"Authorization": "y"})
    assert seen == [ADMIN.encode(), SERVICE_TOKEN.encode()]


# -- tokens never logged ----------------------------------------------------------------------------


def test_tokens_never_reach_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # an in-process uvicorn elsewhere in
        logger = logging.getLogger(name)  # the session turns propagation off and raises the levels
        monkeypatch.setattr(logger, "propagate", True)
        monkeypatch.setattr(logger, "disabled", False)
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test
    with start(data_dir=tmp_path, api_only=True) as client:
        client.post("/", content=b"hello [eos]", headers={"Authorization": TOKEN})
        client.post("/", content=b"hello", headers={"Authorization": f"{TOKEN}-almost"})
        client.get(f"/v1/models?token={TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"})
        with client.websocket_connect(f"/?token={TOKEN}") as ws:
            ws.send_text(json.dumps({"prompt": "x [eos]"}))
            while ws.receive_text() != EOS:
                pass
        # what uvicorn logs for each WebSocket handshake, URL and query string included
        logging.getLogger("uvicorn.error").info(
            '%s - "WebSocket %s" [accepted]', "127.0.0.1", f"/?token={TOKEN}"
        )
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/1.1" %d', "1.2.3.4", "GET", f"/x?a=1&token={TOKEN}", 200
        )
    server_side = [r for r in caplog.records if not r.name.startswith("httpx")]  # not the test's client
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in server_side)
    assert len(server_side) >= 5 and "token=***" in text
    assert TOKEN not in text


def test_the_redaction_filter_masks_query_tokens_and_nothing_else() -> None:
    def through(msg: str, *args: object) -> str:
        record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)
        assert RedactSecrets().filter(record)
        return record.getMessage()

    assert through('"WebSocket %s" [accepted]', "/api/predict/x?token=abc%20d&y=2") == (
        '"WebSocket /api/predict/x?token=***&y=2" [accepted]'
    )
    assert through("GET /?a=1&access_token=zz") == "GET /?a=1&access_token=***"
    assert through("< Authorization: Bearer s3cret") == "< Authorization: ***"  # uvicorn at DEBUG
    assert through("< cookie: access-token-x=abc; easllm_token=s3cret") == "< cookie: ***"
    assert through("the token is required") == "the token is required"
    assert through("100%% done %d", 5) == "100% done 5"


# -- CORS -----------------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_cors_is_closed_by_default(tmp_path: Path) -> None:
    with start(data_dir=tmp_path, api_only=True) as client:
        origin = {"Origin": "https://evil.example"}
        r = client.options("/v1/chat/completions", headers={**origin, **PREFLIGHT})
        assert "access-control-allow-origin" not in r.headers and r.status_code in (401, 405)
        r = client.get("/v1/models", headers={**origin, "Authorization": TOKEN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origin_opens_the_api_to_that_origin_only(tmp_path: Path) -> None:
    good = "https://app.example"
    with start(data_dir=tmp_path, api_only=True, cors_origins=(good,)) as client:
        r = client.options("/v1/chat/completions", headers={"Origin": good, **PREFLIGHT})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == good
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.get("/v1/models", headers={"Origin": good, "Authorization": TOKEN})
        assert (
            r.headers["access-control-allow-origin"] == good
            and "x-request-id" in r.headers["access-control-expose-headers"].lower()
        )
        r = client.get("/v1/models", headers={"Origin": good})  # CORS opens no door: the token still counts
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == good
        r = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert r.status_code == 400 and r.json()["error"]["param"] == "origin"
        assert "--cors-origin" in r.json()["error"]["message"]
        assert "access-control-allow-origin" not in r.headers
        r = client.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": TOKEN})
        assert "access-control-allow-origin" not in r.headers


# -- hostile input ----------------------------------------------------------------------------------------


def test_traversal_names_cannot_delete_outside_the_knowledge_base(tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    with start(data_dir=tmp_path / "data", api_only=True) as client:
        for name in ("..%2F..%2Fprecious.txt", "%2E%2E%2F%2E%2E%2Fprecious.txt", "..\\..\\precious.txt"):
            r = client.delete(f"/v1/knowledge/files/{name}", headers={"Authorization": TOKEN})
            assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert outside.read_text() == "keep me"


HOSTILE_TEMPLATES = {
    "escape": "{{ cycler.__init__.__globals__.os.system('touch ESCAPED') }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "mutation": "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
    "runaway loop": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "memory bomb": "{{ 'x' * 10**10 }}",
    "format width": "{{ '{:>999999999}'.format(messages[0]['content']) }}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_a_400_and_the_server_keeps_serving(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = FakeEngine(context_length=512, chat_template=HOSTILE_TEMPLATES[name])  # as a GGUF would carry it
    with start(engine, data_dir=tmp_path, api_only=True) as client:
        started = time.monotonic()
        r = client.post("/", json={"prompt": "hello"}, headers={"Authorization": TOKEN})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"], r.text
        assert time.monotonic() - started < 15  # bounded (2 s of template time, plus a busy machine)
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=chat, headers={"Authorization": TOKEN})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = client.post("/", json={"prompt": "raw", "no_template": True}, headers={"Authorization": TOKEN})
        assert r.status_code == 200  # the template is refused, not the server
    assert not (tmp_path / "ESCAPED").exists() and engine.requests[-1].prompt_token_ids
