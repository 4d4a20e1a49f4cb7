"""Service tokens: raw `Authorization: <token>` (as EAS clients send it) or `Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from easllm.server.lockout import FailedTokens, busy_message
from easllm.server.state import state_of


def token_matches(header: str | None, token: str) -> bool:
    if not header:
        return False
    value = header.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value.encode(), token.encode())


async def check_token(failures: FailedTokens, client: str | None, token: str, *presented: str | None) -> int:
    """200 when a presented value is the token; 401 otherwise (slowed down for a client that
    keeps failing: `server/lockout.py`); 429 when that client has too many checks under way."""
    if not any(presented):
        return 401  # no guess: nothing to slow down
    return await failures.check(client, lambda: any(token_matches(value, token) for value in presented))


def raise_unless(verdict: int, missing: str) -> None:
    if verdict == 429:
        raise HTTPException(429, busy_message())  # Retry-After: server/errors.py
    if verdict != 200:
        raise HTTPException(401, missing)


async def require_token(request: Request) -> None:
    state = state_of(request.app)
    token = state.config.token
    if not token:
        return
    client = request.client.host if request.client else None
    verdict = await check_token(state.failed_tokens, client, token, request.headers.get("authorization"))
    raise_unless(verdict, "missing or wrong token in the Authorization header")


def serve_openapi(app: FastAPI, guard: Callable[[Request], Awaitable[None]]) -> None:
    """`GET /openapi.json` behind `guard` (FastAPI's own is open to anyone)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(guard)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())
