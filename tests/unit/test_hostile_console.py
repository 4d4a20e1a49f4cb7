"""Hostile input, round 2 (issue 16), on the console: its gateway streams bodies instead of holding
them, it has request limits, Host/Origin checks and a lockout for wrong tokens; its page runs under
a CSP; specs cannot set flags the console owns; secrets on disk are the owner's only; replicas do
not inherit the admin token; `--token-file` keeps the token out of `ps`."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from easllm.cli import build_parser, configs_from
from easllm.control.app import create_console_app
from easllm.control.cli import console_config
from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry
from easllm.control.routing import ReplicaState, ServiceRoute
from easllm.control.runtimes.processes import replica_env
from easllm.control.spec import parse_spec
from easllm.errors import InvalidRequest
from easllm.export.exporter import HistoryExporter
from tests.browser import serve_in_thread

ADMIN = "admin-hostile-1"
TOKEN = "svc-hostile-1"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[TestClient]:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    config = ConsoleConfig(state_dir=tmp_path, port=18997, admin_token=ADMIN)
    with TestClient(create_console_app(config, registry), base_url="http://127.0.0.1:18997") as client:
        yield client
    registry.close()


class CountingReplica:
    """A stand-in replica: it answers how many body bytes it got, and notes when the first arrive."""

    def __init__(self) -> None:
        self.first_bytes = threading.Event()

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        total, more = 0, True
        while more:
            message = await receive()
            total += len(message.get("body", b""))
            more = message.get("more_body", False)
            if total:
                self.first_bytes.set()
        body = json.dumps({"received": total}).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_the_gateway_streams_a_large_body_through_instead_of_holding_it(tmp_path: Path) -> None:
    replica = CountingReplica()
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    app = create_console_app(ConsoleConfig(state_dir=tmp_path, admin_token=ADMIN), registry)
    with serve_in_thread(replica) as replica_url, serve_in_thread(app) as console_url:  # type: ignore[arg-type]
        port = int(replica_url.rsplit(":", 1)[1])
        state = ReplicaState(1, "echo", 1, port, "/dev/null", status="ready")
        app.state.console.routing.add(ServiceRoute("echo", TOKEN, 1, replicas=[state]))
        piece = b"x" * 65536

        def body() -> Iterator[bytes]:
            yield piece
            # before the fix the gateway read the whole body first: the replica saw nothing yet
            assert replica.first_bytes.wait(10), "the gateway held the body back"
            for _ in range(31):
                yield piece

        url = f"{console_url}/api/predict/echo/v1/knowledge/files"
        r = requests.post(url, data=body(), headers={"Authorization": TOKEN}, timeout=30)
        assert r.status_code == 200 and r.json() == {"received": 32 * len(piece)}
        small = requests.post(
            f"{console_url}/api/predict/echo/", data=b"hello", headers={"Authorization": TOKEN}
        )
        assert small.json() == {"received": 5}  # small bodies are still held, so they can be retried
    registry.close()


def test_the_console_refuses_bodies_over_the_limit_before_reading_them(console: TestClient) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Length": str(100 * 1024 * 1024)}
    r = console.post("/api/services", content=b"{}", headers=headers)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]


def test_deep_json_to_the_console_api_is_a_400(console: TestClient) -> None:
    body = '{"name": "x", "args": ' + "[" * 5_000 + "]" * 5_000 + "}"
    r = console.post("/api/services", content=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_a_client_whose_requests_keep_being_refused_waits_at_the_console(console: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    budget = console.app.state.refusals  # type: ignore[attr-defined]
    for _ in range(10):  # 404s for a service that does not exist
        assert console.post("/api/predict/nope/", json={}, headers=admin).status_code == 404
    assert budget.tokens("testclient") < budget.burst - 5  # each refusal drained its bucket
    assert len(budget) == 1 and budget.tokens("10.0.0.2") == budget.burst  # nobody else has one
    assert console.get("/api/services", headers=admin).status_code == 200  # still served


def test_the_console_refuses_foreign_hosts_and_foreign_pages(console: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert console.get("/api/services", headers={**admin, "Host": "evil.example"}).status_code == 403
    r = console.post("/api/services", json={}, headers={**admin, "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
    assert console.get("/api/services", headers=admin).status_code == 200
    with pytest.raises(WebSocketDenialResponse) as denied:
        console.websocket_connect("/api/predict/echo", headers={"Origin": "http://evil.example"}).__enter__()
    assert denied.value.status_code == 403


def test_allowed_hosts_and_the_public_url_are_answered(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    config = ConsoleConfig(
        state_dir=tmp_path,
        admin_token=ADMIN,
        public_url="https://llm.example.com",
        allowed_hosts=("console.internal", "proxy.lan", "10.0.0.5:8080"),
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_console_app(config, registry), base_url="http://127.0.0.1:8080") as client:
        for host in ("console.internal", "proxy.lan:8080", "10.0.0.5:8080", "llm.example.com", "localhost"):
            assert client.get("/api/services", headers={**admin, "Host": host}).status_code == 200, host
        r = client.get("/api/services", headers={**admin, "Host": "evil.example"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "host"
    registry.close()


def test_the_console_flag_reads_repeated_and_comma_separated_hosts(tmp_path: Path) -> None:
    hosts = ["--allowed-hosts", "a.lan,b.lan", "--allowed-hosts", " c.lan "]
    argv = ["console", *hosts, "--state-dir", str(tmp_path), "--admin-token", ADMIN]
    config = console_config(build_parser().parse_args(argv))
    assert config.allowed_hosts == ("a.lan", "b.lan", "c.lan") and config.admin_token == ADMIN


def test_wrong_tokens_at_the_gateway_slow_down_the_admin_api_too(console: TestClient) -> None:
    console.app.state.console.routing.add(ServiceRoute("echo", TOKEN, 1))  # type: ignore[attr-defined]
    for _ in range(10):
        r = console.post("/api/predict/echo", content=b"hi", headers={"Authorization": "guess"})
        assert r.status_code == 401
    started = time.monotonic()
    assert console.get("/api/services", headers={"Authorization": "guess"}).status_code == 401
    assert time.monotonic() - started >= 0.9
    started = time.monotonic()
    assert console.get("/api/services", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert time.monotonic() - started < 0.5


def test_the_console_page_runs_under_a_csp_and_keeps_the_token_in_memory(console: TestClient) -> None:
    r = console.get("/")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "no-referrer"
    assert "sessionStorage." not in r.text and "localStorage." not in r.text
    assert "onclick=" not in r.text  # inline handlers would not run under the CSP
    assert '"_blank", "noopener,noreferrer"' in r.text


# -- specs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "8000"],  # the default value, which the old check let through
        ["--model-path", "qwen2.5-0.5b-instruct"],
        ["--host=127.0.0.1"],
        ["--token-file", "/etc/passwd"],
        ["--root-path", ""],
    ],
)
def test_a_spec_cannot_set_a_flag_the_console_owns_whatever_its_value(args: list[str]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_spec({"name": "svc", "args": args})
    assert refused.value.param == "args" and "is set by the console" in refused.value.message


def test_other_flags_still_pass_with_their_values() -> None:
    spec = parse_spec({"name": "svc", "args": ["--max-new-tokens", "64", "--threads", "2"]})
    options = spec.serve_options()
    assert options.max_new_tokens == 64 and options.threads == 2 and options.port == 8000


# -- secrets on disk and in the environment ----------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("loose_umask")
def test_the_console_database_is_the_owners_only(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'state' / 'console.db'}")
    registry.create_service(parse_spec({"name": "svc", "token": "secret-token"}))
    registry.close()
    for path in (tmp_path / "state").glob("console.db*"):
        assert mode(path) == 0o600, path


@pytest.mark.usefixtures("loose_umask")
def test_history_logs_and_exports_are_the_owners_only(tmp_path: Path) -> None:
    history = HistoryExporter(tmp_path / "export", tmp_path / "wal", 60.0)
    history.record(b'{"prompt": "a private question"}\n')
    assert mode(tmp_path / "wal") == 0o700
    history.close()
    exports = list((tmp_path / "export").glob("*.jsonl"))
    assert exports and all(mode(p) == 0o600 for p in exports)
    assert mode(tmp_path / "export") == 0o700


def test_replicas_do_not_inherit_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_ADMIN_TOKEN", "the-admin-token")
    monkeypatch.setenv("HF_HOME", "/models")
    env = replica_env(parse_spec({"name": "svc", "token": "svc-token"}).with_token())
    assert "EASLLM_ADMIN_TOKEN" not in env and "the-admin-token" not in env.values()
    assert env["EASLLM_TOKEN"] == "svc-token" and env["HF_HOME"] == "/models"


def test_token_file_reads_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-token\nrest ignored\n")
    args = build_parser().parse_args(["serve", "--token-file", str(path)])
    assert configs_from(args)[0].token == "file-token"
    path.write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        configs_from(build_parser().parse_args(["serve", "--token-file", str(path)]))
    with pytest.raises(SystemExit, match="cannot read it"):
        configs_from(build_parser().parse_args(["serve", "--token-file", str(tmp_path / "missing")]))


def test_allowed_hosts_flag_takes_lists_and_repeats() -> None:
    args = build_parser().parse_args(
        ["serve", "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c"]
    )
    assert configs_from(args)[0].allowed_hosts == ("a.example", "b.example", "c")
