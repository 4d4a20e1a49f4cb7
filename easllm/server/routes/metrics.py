"""`GET /metrics`: Prometheus text format; needs the service token unless `--metrics-public`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from easllm.server.auth import require_token
from easllm.server.metrics import ServiceMetrics

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    if not request.app.state.config.metrics_public:
        await require_token(request)
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
