"""Probes: `/live` (the process answers), `/health` (the model is loaded: 200, else 503) and
`/ready` (loaded and the engine making progress), each with the engine's state in JSON.

`/health` keeps the contract the console, the tests and EAS-style clients poll: 200 once the
model is loaded, 503 while loading (`status: loading`) or after a failed load (`status: failed`).
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from easllm.server.state import State

router = APIRouter()


@router.get("/live")
async def live() -> JSONResponse:
    """Liveness: 200 whenever the event loop answers, loading or not (restart only if this fails)."""
    return JSONResponse({"status": "alive"})


@router.get("/health")
async def health(state: State) -> JSONResponse:
    engine_health = state.engine.health()
    body = {"status": "ok" if engine_health.ready else "loading", "engine": asdict(engine_health)}
    if state.load_error:
        body = {"status": "failed", "error": state.load_error, "engine": asdict(engine_health)}
    return JSONResponse(body, status_code=200 if engine_health.ready else 503)


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 when the model is loaded and the engine is not stuck; 503 otherwise."""
    engine_health = state.engine.health()
    stalled = state.engine_watch.stalled_for(engine_health) if engine_health.ready else None
    body: dict[str, object] = {"status": "ready", "engine": asdict(engine_health)}
    if state.load_error:
        body.update(status="failed", error=state.load_error)
    elif not engine_health.ready:
        body["status"] = "loading"
    elif stalled is not None:
        body.update(
            status="stalled", error=f"the engine has made no progress for {stalled:.0f}s with work queued"
        )
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)
