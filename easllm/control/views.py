"""How the console shows a service's parts as JSON: replicas, versions, events, invocation details."""

from __future__ import annotations

from typing import Any

from easllm.control.registry import EventRecord, VersionRecord
from easllm.control.routing import ReplicaState


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
