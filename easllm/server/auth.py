"""Service tokens: raw `Authorization: <token>` (as EAS clients send it) or `Bearer <token>`."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


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
