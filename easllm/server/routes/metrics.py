"""`GET /metrics`: Prometheus text format; needs the service token unless `--metrics-public`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from easllm.server.auth import require_token
from easllm.server.state import State

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, state: State) -> Response:
    if not state.config.metrics_public:
        await require_token(request)
    body, content_type = state.metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})
