"""Service tokens: raw `Authorization: <token>` (as EAS clients send it) or `Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from easllm.server.lockout import FailedTokens, lockout_message


def token_matches(header: str | None, token: str) -> bool:
    if not header:
        return False
    value = header.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return hmac.compare_digest(value.encode(), token.encode())


def token_verdict(failures: FailedTokens, client: str | None, token: str, *presented: str | None) -> int:
    """200 when a presented value is the token, 429 while the client is locked out
    (its token is not even checked), else 401 (and, when it tried a token, one more failure)."""
    if not any(presented):
        return 401  # no guess: nothing to slow down
    if failures.locked_for(client):
        return 429
    if any(token_matches(value, token) for value in presented):
        failures.succeeded(client)
        return 200
    failures.failed(client)
    return 401


def raise_unless(verdict: int, failures: FailedTokens, client: str | None, missing: str) -> None:
    if verdict == 429:
        wait = failures.locked_for(client)
        raise HTTPException(429, lockout_message(wait), headers={"Retry-After": str(int(wait) + 1)})
    if verdict != 200:
        raise HTTPException(401, missing)


async def require_token(request: Request) -> None:
    token: str | None = request.app.state.config.token
    if not token:
        return
    failures: FailedTokens = request.app.state.failed_tokens
    client = request.client.host if request.client else None
    verdict = token_verdict(failures, client, token, request.headers.get("authorization"))
    raise_unless(verdict, failures, client, "missing or wrong token in the Authorization header")


def serve_openapi(app: FastAPI, guard: Callable[[Request], Awaitable[None]]) -> None:
    """`GET /openapi.json` behind `guard` (FastAPI's own is open to anyone)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(guard)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())
