"""The console's REST API (`/api/...`), behind the admin token; the same verbs as the CLI.

GET    /api/services                   list
POST   /api/services[?dry_run=true]    deploy a spec (201), or only check it and recommend
POST   /api/recommend                  recommended resources for a (partial) spec
GET    /api/services/{name}            describe: endpoint, token, replicas, versions, events
PATCH  /api/services/{name}            update: the fields to change -> a new version (202)
POST   /api/services/{name}/stop|start
DELETE /api/services/{name}
GET    /api/services/{name}/logs?tail=100&follow=false&replica=ID
GET    /api/machine, /api/models
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from easllm.control.controller import Controller
from easllm.control.logs import follow, replica_logs, tail_lines
from easllm.control.registry import UnknownService
from easllm.control.spec import parse_spec
from easllm.errors import InvalidRequest
from easllm.protocol.validation import load_json
from easllm.server.auth import check_token, raise_unless


async def require_admin(request: Request) -> None:
    token: str = request.app.state.console.config.admin_token
    failures = request.app.state.failed_tokens
    client = request.client.host if request.client else None
    verdict = await check_token(failures, client, token, request.headers.get("authorization"))
    raise_unless(verdict, "missing or wrong admin token (Authorization: Bearer <admin token>)")


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], tags=["console"])


def _controller(request: Request) -> Controller:
    controller: Controller = request.app.state.console.controller
    return controller


async def _json_object(request: Request) -> dict[str, Any]:
    data = load_json(await request.body() or b"null", None)
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", None)
    return data


def _known(controller: Controller, name: str) -> None:
    try:
        controller.registry.get(name)
    except UnknownService as exc:
        raise HTTPException(404, f"no service named {name}") from exc


@router.get("/services")
async def list_services(request: Request) -> list[dict[str, Any]]:
    return _controller(request).list()


@router.post("/services", status_code=201)
async def deploy(request: Request, dry_run: bool = False) -> Response:
    controller = _controller(request)
    spec = parse_spec(await _json_object(request))
    if dry_run:
        rec = await asyncio.to_thread(controller.check, spec)  # may ask the model's source for sizes
        return JSONResponse(
            {"spec": spec.public(), "recommendation": rec.as_dict(), "summary": rec.summary()}
        )
    record = await controller.deploy(spec)
    return JSONResponse(controller.describe(record.name), status_code=201)


@router.post("/recommend")
async def recommendation(request: Request) -> dict[str, Any]:
    data = await _json_object(request)
    spec = parse_spec({"name": "preview", **data})
    rec = await asyncio.to_thread(_controller(request).check, spec)
    return {"recommendation": rec.as_dict(), "summary": rec.summary()}


@router.get("/services/{name}")
async def describe(request: Request, name: str) -> dict[str, Any]:
    controller = _controller(request)
    _known(controller, name)
    return controller.describe(name)


@router.patch("/services/{name}", status_code=202)
async def update(request: Request, name: str) -> dict[str, Any]:
    controller = _controller(request)
    _known(controller, name)
    version = await controller.update(name, await _json_object(request))
    return {**controller.describe(name), "rollout": {"version": version}}


@router.post("/services/{name}/stop")
async def stop(request: Request, name: str) -> dict[str, Any]:
    controller = _controller(request)
    _known(controller, name)
    await controller.stop(name)
    return controller.describe(name)


@router.post("/services/{name}/start", status_code=202)
async def start(request: Request, name: str) -> dict[str, Any]:
    controller = _controller(request)
    _known(controller, name)
    await controller.start(name)
    return controller.describe(name)


@router.delete("/services/{name}")
async def delete(request: Request, name: str) -> dict[str, Any]:
    controller = _controller(request)
    _known(controller, name)
    await controller.delete(name)
    return {"deleted": name}


@router.get("/services/{name}/logs", response_model=None)
async def logs(
    request: Request,
    name: str,
    tail: int = Query(100, ge=0, le=100_000),
    follow_: bool = Query(False, alias="follow"),
    replica: int | None = Query(None, ge=1),
) -> Response:
    controller = _controller(request)
    _known(controller, name)
    log_dir = controller.config.log_dir(name)
    if replica is not None and not replica_logs(log_dir, replica):
        raise HTTPException(404, f"service {name} has no log of replica {replica}")
    if not follow_:
        return PlainTextResponse(tail_lines(replica_logs(log_dir, replica), tail))

    def still_wanted() -> bool:
        return controller.routing.route(name) is not None

    return StreamingResponse(follow(log_dir, replica, tail, still_wanted), media_type="text/plain")


@router.get("/machine")
async def machine(request: Request) -> dict[str, object]:
    return _controller(request).machine().as_dict()


@router.get("/models")
async def models() -> dict[str, list[dict[str, object]]]:
    from easllm.models.bundled import BUNDLED
    from easllm.models.catalog import CATALOG

    return {
        "bundled": [{"name": b.name, "description": b.description, "chat": b.chat} for b in BUNDLED.values()],
        "catalog": [
            {
                "name": c.name,
                "repo_id": c.repo_id,
                "params_b": c.params_b,
                "context_length": c.context_length,
                "gguf_repo": c.gguf_repo or None,
                "quantizations": list(c.gguf_files),
            }
            for c in CATALOG.values()
        ],
    }
