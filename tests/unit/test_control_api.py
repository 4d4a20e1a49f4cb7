"""The console's REST API and gateway in-process: every endpoint's bad input, with no replica started.

One service exists already, stopped, so duplicates, updates of a stopped service, stop/delete and
the gateway's 503 can be checked without processes.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from easllm.control.app import create_console_app
from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry
from easllm.control.spec import parse_spec

ADMIN = {"Authorization": "Bearer admin-token-1"}
TOKEN = "service-token-1"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    registry.create_service(parse_spec({"name": "parked", "engine": "fake", "token": TOKEN}))
    registry.set_version_status("parked", 1, "active")
    registry.update_service("parked", desired="stopped", status="stopped")
    config = ConsoleConfig(state_dir=tmp_path, port=18999, admin_token="admin-token-1")
    with TestClient(create_console_app(config, registry)) as test_client:
        yield test_client
    registry.close()


def error(r, status: int, param: str | None = None) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == status and body["param"] == param
    return body["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/services"), ("POST", "/api/services"), ("GET", "/api/services/parked"),
     ("PATCH", "/api/services/parked"), ("POST", "/api/services/parked/stop"),
     ("POST", "/api/services/parked/start"), ("DELETE", "/api/services/parked"),
     ("GET", "/api/services/parked/logs"), ("GET", "/api/machine"), ("POST", "/api/recommend"),
     ("GET", "/api/models")],
)  # fmt: skip
def test_every_api_route_needs_the_admin_token(
    client: TestClient, method: str, path: str, headers: dict
) -> None:
    assert "admin token" in error(client.request(method, path, headers=headers), 401)


def test_list_and_describe_show_invocation_information(client: TestClient) -> None:
    [service] = client.get("/api/services", headers=ADMIN).json()
    assert service["name"] == "parked" and service["status"] == "stopped"
    assert service["endpoint"] == "http://127.0.0.1:18999/api/predict/parked"
    described = client.get("/api/services/parked", headers=ADMIN).json()
    assert (
        described["invocation"]["token"] == TOKEN
        and described["invocation"]["endpoint"] == service["endpoint"]
    )
    assert described["invocation"]["websocket"] == "ws://127.0.0.1:18999/api/predict/parked"
    assert described["versions"][0]["status"] == "active" and described["instances"] == []
    assert "token" not in described["spec"]


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b'["a"]', 400, None, "JSON object"),
        (b'{"name": "bad-name"}', 400, "name", "letters, digits"),
        (b'{"name": "ok", "replicas": 0}', 400, "replicas", "greater than or equal to 1"),
        (b'{"name": "ok", "modle": "x"}', 400, "modle", "unknown field"),
        (b'{"name": "ok", "model": "no-such-model"}', 400, "model", "unknown model"),
        (b'{"name": "ok", "model": "qwen1.5-7b"}', 400, "model", "not on this machine"),
        (b'{"name": "ok", "model": "qwen1.5-7b", "engine": "vllm"}', 400, "model", "vLLM needs a CUDA GPU"),
        (
            b'{"name": "ok", "engine": "fake", "resources": {"memory": 999999999}}',
            400,
            "resources.memory",
            "GiB",
        ),
        (
            b'{"name": "ok", "engine": "fake", "resources": {"cpu": 1024}}',
            400,
            "resources.cpu",
            "this machine has",
        ),
        (b'{"name": "ok", "engine": "fake", "args": ["--port", "1"]}', 400, "args", "set by the console"),
        (b'{"name": "parked", "engine": "fake"}', 409, "name", "exists already"),
    ],
)
def test_deploy_refuses_bad_specs(
    client: TestClient, body: bytes, status: int, param: str | None, text: str
) -> None:
    r = client.post("/api/services", content=body, headers={**ADMIN, "Content-Type": "application/json"})
    assert text in error(r, status, param)
    assert [s["name"] for s in client.get("/api/services", headers=ADMIN).json()] == ["parked"]


def test_dry_run_recommends_and_deploys_nothing(client: TestClient) -> None:
    r = client.post("/api/services?dry_run=true", json={"name": "big", "model": "qwen1.5-7b"}, headers=ADMIN)
    assert r.status_code == 200
    rec = r.json()["recommendation"]
    assert rec["fits"] is False and rec["params_b"] == 7.7 and rec["recommended"]["cpu"] == 8
    assert "memory per replica" in r.json()["summary"]
    assert len(client.get("/api/services", headers=ADMIN).json()) == 1


def test_recommend_takes_a_partial_spec(client: TestClient) -> None:
    r = client.post("/api/recommend", json={"model": "gemma3-270m"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["recommendation"]["engine"] == "llamacpp"
    assert error(client.post("/api/recommend", json={"replicas": "many"}, headers=ADMIN), 400, "replicas")


def test_unknown_services_are_404_for_every_verb(client: TestClient) -> None:
    for method, path in [("GET", ""), ("PATCH", ""), ("POST", "/stop"), ("POST", "/start"), ("DELETE", ""),
                         ("GET", "/logs")]:  # fmt: skip
        r = client.request(method, f"/api/services/nope{path}", json={"replicas": 2}, headers=ADMIN)
        assert "no service named nope" in error(r, 404)


@pytest.mark.parametrize(
    ("changes", "param", "text"),
    [
        ({}, None, "at least one field"),
        ({"name": "renamed"}, "name", "cannot be renamed"),
        ({"replicas": 99}, "replicas", "less than or equal to 16"),
        ({"engine": "magic"}, "engine", "Input should be"),
        ({"replicas": 1}, "replicas", "changes nothing"),
    ],
)
def test_update_refuses_bad_changes(client: TestClient, changes: dict, param: str | None, text: str) -> None:
    assert text in error(client.patch("/api/services/parked", json=changes, headers=ADMIN), 400, param)


def test_updating_a_stopped_service_records_a_version_for_its_next_start(client: TestClient) -> None:
    r = client.patch(
        "/api/services/parked", json={"replicas": 2, "args": ["--max-new-tokens", "4"]}, headers=ADMIN
    )
    assert r.status_code == 202 and r.json()["rollout"] == {"version": 2}
    described = client.get("/api/services/parked", headers=ADMIN).json()
    assert [(v["version"], v["status"]) for v in described["versions"]] == [(1, "superseded"), (2, "active")]
    assert described["version"] == 2 and described["spec"]["replicas"] == 2 and described["instances"] == []


def test_stopping_a_stopped_service_conflicts(client: TestClient) -> None:
    assert "stopped already" in error(client.post("/api/services/parked/stop", headers=ADMIN), 409)


def test_logs_check_their_parameters(client: TestClient) -> None:
    assert error(client.get("/api/services/parked/logs?tail=-1", headers=ADMIN), 400, "query")
    assert error(client.get("/api/services/parked/logs?replica=0", headers=ADMIN), 400, "query")
    assert "no log of replica 7" in error(
        client.get("/api/services/parked/logs?replica=7", headers=ADMIN), 404
    )
    r = client.get("/api/services/parked/logs", headers=ADMIN)
    assert r.status_code == 200 and r.text == ""


def test_delete_removes_the_service(client: TestClient) -> None:
    assert client.delete("/api/services/parked", headers=ADMIN).json() == {"deleted": "parked"}
    assert client.get("/api/services", headers=ADMIN).json() == []
    assert error(client.post("/api/predict/parked", content=b"hi", headers={"Authorization": TOKEN}), 404)


def test_gateway_checks_the_service_token_then_says_stopped(client: TestClient) -> None:
    assert "no service named nope" in error(client.post("/api/predict/nope", content=b"hi"), 404)
    assert "wrong token" in error(client.post("/api/predict/parked", content=b"hi"), 401)
    r = client.post("/api/predict/parked", content=b"hi", headers={"Authorization": "Bearer wrong-token"})
    assert "wrong token" in error(r, 401)
    r = client.post(
        "/api/predict/parked/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert "easllm start parked" in error(r, 503)
    assert r.headers["retry-after"] == "1"
    assert "easllm start parked" in error(
        client.post(f"/api/predict/parked?token={TOKEN}", content=b"hi"), 503
    )


def test_gateway_websocket_refuses_a_wrong_token(client: TestClient) -> None:
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as info, client.websocket_connect("/api/predict/parked"):
        pass
    assert info.value.status_code == 401
    with (
        pytest.raises(WebSocketDenialResponse) as info,
        client.websocket_connect(f"/api/predict/parked?token={TOKEN}"),
    ):
        pass
    assert info.value.status_code == 503


def test_machine_models_page_and_openapi(client: TestClient) -> None:
    machine = client.get("/api/machine", headers=ADMIN).json()
    assert machine["cpus"] >= 1 and machine["memory_total_bytes"] > 0
    models = client.get("/api/models", headers=ADMIN).json()
    assert "gemma3-270m" in [m["name"] for m in models["bundled"]] and len(models["catalog"]) == 16
    page = client.get("/")
    assert page.status_code == 200 and "Invocation information" in page.text and "View Web App" in page.text
    assert client.get("/openapi.json").status_code == 401  # the API's description is for admins
    paths = client.get("/openapi.json", headers=ADMIN).json()["paths"]
    assert "/api/services" in paths and "/api/services/{name}/logs" in paths
    assert not [p for p in paths if p.startswith("/api/predict")]
