"""How the console shows a service's parts as JSON: replicas, versions, events, invocation details."""

from __future__ import annotations

from typing import Any

from easllm.control.registry import EventRecord, ServiceRecord, VersionRecord
from easllm.control.routing import ReplicaState
from easllm.control.spec import ServiceSpec


def service_summary(record: ServiceRecord, spec: ServiceSpec, ready: int, endpoint: str) -> dict[str, Any]:
    """One line of `easllm list` (and the head of `describe`)."""
    return {
        "name": record.name,
        "status": record.status,
        "desired": record.desired,
        "version": record.current_version,
        "model": spec.model,
        "engine": spec.engine,
        "replicas": {"wanted": spec.replicas, "ready": ready},
        "endpoint": endpoint,
        "webui": f"{endpoint}/webui/",
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def changes_between(old: ServiceSpec, new: ServiceSpec) -> str:
    """What an update changes, for its event: `field old -> new, ...`."""
    a, b = old.public(), new.public()
    diff = [f"{k} {a[k]!r} -> {b[k]!r}" for k in b if a.get(k) != b[k]]
    if old.token != new.token:
        diff.append("new token")
    return ", ".join(diff) or "no change"


def invocation(endpoint: str, token: str) -> dict[str, str]:
    """What a user needs to call the service (the source's "Invocation information")."""
    return {
        "endpoint": endpoint,
        "token": token,
        "websocket": endpoint.replace("http", "ws", 1),
        "openai_base_url": f"{endpoint}/v1",
        "webui": f"{endpoint}/webui/",
        "curl": f'curl {endpoint} -H "Authorization: {token}" --data-binary @prompt.txt',
    }


def version_json(v: VersionRecord) -> dict[str, Any]:
    return {
        "version": v.version,
        "status": v.status,
        "created_at": v.created_at.isoformat(),
        "model": v.spec.model,
        "engine": v.spec.engine,
        "replicas": v.spec.replicas,
    }


def event_json(e: EventRecord) -> dict[str, Any]:
    return {"at": e.at.isoformat(), "kind": e.kind, "message": e.message}


def replica_json(
    live: ReplicaState | None, rid: int, version: int, port: int, pid: int | None, status: str, restarts: int
) -> dict[str, Any]:
    if live is None:
        return {
            "id": rid,
            "version": version,
            "port": port,
            "pid": pid,
            "status": status,
            "restarts": restarts,
        }
    return {
        "id": rid,
        "version": live.version,
        "port": live.port,
        "pid": live.pid,
        "status": live.status,
        "restarts": live.restarts,
        "exit_code": live.exit_code,
        "outstanding": live.outstanding,
        "served": live.served,
        "detail": live.detail,
        "log": live.log_path,
    }
