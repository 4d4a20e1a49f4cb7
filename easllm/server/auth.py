"""Service tokens: raw `Authorization: <token>` (as EAS clients send it) or `Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse


def token_matches(header: str | None, token: str) -> bool:
    if not header:
        return False
    value = header.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value.encode(), token.encode())


async def require_token(request: Request) -> None:
    token: str | None = request.app.state.config.token
    if token and not token_matches(request.headers.get("authorization"), token):
        raise HTTPException(status_code=401, detail="missing or wrong token in the Authorization header")


def serve_openapi(app: FastAPI, guard: Callable[[Request], Awaitable[None]]) -> None:
    """`GET /openapi.json` behind `guard` (FastAPI's own is open to anyone)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(guard)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())
