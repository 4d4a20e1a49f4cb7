"""One log line and one metrics sample per HTTP request or WebSocket connection.

A pure ASGI middleware (it sees a streamed response to its last byte): it gives each request an
id (the client's `X-Request-Id` when it is a sane one), returns it in the `X-Request-Id` header,
and when the response ends logs id, method, route, status, latency and tokens on the
`easllm.access` logger. Probes (/health, /live, /ready, /metrics) that succeed log at DEBUG, so
they do not drown the rest. Nothing from the body or the Authorization header is logged.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easllm.server.metrics import ServiceMetrics
from easllm.serving.caller import RequestInfo

log = logging.getLogger("easllm.access")

SCOPE_KEY = "easllm.request"  # the request's RequestInfo in the ASGI scope

HEADER = b"x-request-id"
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PROBES = frozenset({"/health", "/live", "/ready", "/metrics"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "WS"})


def method_label(method: str) -> str:
    """The method as a metrics label: any method outside HTTP's usual ones is `other` (bounded series)."""
    return method if method in METHODS else "other"


def request_info(conn: HTTPConnection) -> RequestInfo | None:
    """The RequestInfo this middleware put in the scope (the serving layer adds the tokens)."""
    info: RequestInfo | None = conn.scope.get(SCOPE_KEY)
    return info


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        info = RequestInfo()
        given = _header(scope, HEADER)
        if given and SANE_ID.fullmatch(given):
            info.request_id = given
        scope[SCOPE_KEY] = info
        id_header = (HEADER, info.request_id.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            t = message["type"]
            if t in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            elif t == "websocket.accept":
                status = 101
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            elif t == "websocket.close" and status == 0:
                status = 403  # closed before accepting: what the client sees
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            self.metrics.in_progress.dec()
            self._done(scope, info, status or 500)

    def _done(self, scope: Scope, info: RequestInfo, status: int) -> None:
        elapsed = time.perf_counter() - info.started
        route = _route(scope)
        method = scope.get("method", "WS")
        label = method_label(method)
        self.metrics.requests.labels(route, label, str(status)).inc()
        self.metrics.request_duration.labels(route, label).observe(elapsed)
        method = method if label != "other" else ascii(method[:32])
        level = logging.DEBUG if route in PROBES and status < 400 else logging.INFO
        if not log.isEnabledFor(level):
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": info.request_id,
            "method": method,
            "route": route,
            "path": scope.get("path", ""),
            "status": status,
            "latency_ms": round(elapsed * 1000, 1),
            "prompt_tokens": info.prompt_tokens,
            "completion_tokens": info.completion_tokens,
            "rounds": info.rounds,
            "client": client[0] if client else None,
        }
        log.log(
            level,
            "%s %s %d %.1fms tokens=%d/%d id=%s client=%s",
            method,
            fields["path"],
            status,
            fields["latency_ms"],
            info.prompt_tokens,
            info.completion_tokens,
            info.request_id,
            fields["client"],
            extra={"access": fields},
        )


def _route(scope: Scope) -> str:
    """The matched route's template (bounded label values); `unmatched` for 404s."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else ("unmatched" if route is None else "/")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
