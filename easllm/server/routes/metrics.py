"""`GET /metrics`: Prometheus text format; needs the service token unless `--metrics-public`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from easllm.server.auth import require_token
from easllm.server.metrics import ServiceMetrics

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    if not request.app.state.config.metrics_public:
        await require_token(request)
    service_metrics: ServiceMetrics = request.app.state.metrics
    body, content_type = service_metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"Content-Type": content_type})
