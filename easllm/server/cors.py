"""CORS, closed unless `--cors-origin` names the browser origins allowed to call the API.

Starlette's middleware, with its one refusal (a preflight from an origin, method or header that
is not allowed) answered in the JSON error shape of every other refusal.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from easllm.server.errors import error_body

ALLOWED_METHODS = ["GET", "POST", "DELETE"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Request-Id"]
EXPOSED_HEADERS = ["X-Request-Id", "Retry-After"]


class ApiCORS(CORSMiddleware):
    def __init__(self, app: ASGIApp, origins: tuple[str, ...]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=ALLOWED_METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        body = error_body(400, f"{refused} (allowed origins are set with --cors-origin)", "origin")
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        headers["content-type"] = "application/json"
        return Response(json.dumps(body), status_code=400, headers=headers)
