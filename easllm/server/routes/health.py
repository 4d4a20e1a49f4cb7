"""`GET /health`: 200 once the model is loaded and the engine runs, 503 before."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    engine_health = state.engine.health()
    body = {"status": "ok" if engine_health.ready else "loading", "engine": asdict(engine_health)}
    if state.load_error:
        body = {"status": "failed", "error": state.load_error, "engine": asdict(engine_health)}
    return JSONResponse(body, status_code=200 if engine_health.ready else 503)
