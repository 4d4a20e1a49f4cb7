"""HTTP answers of the one error policy (`easllm.errors.failure`): the JSON error shape, the status
and the headers. `Retry-After` is set here and nowhere else in the app's handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from easllm.errors import EngineError, Failure, InvalidRequest, NotReady, failure

log = logging.getLogger(__name__)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    return Failure(status, message, param).body()


def failure_headers(failed: Failure) -> dict[str, str]:
    headers = {}
    if failed.retry_after is not None:
        headers["Retry-After"] = str(failed.retry_after)
    if failed.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def failure_response(failed: Failure, headers: dict[str, str] | None = None) -> JSONResponse:
    merged = {**failure_headers(failed), **(headers or {})}
    return JSONResponse(failed.body(), status_code=failed.status, headers=merged or None)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return failure_response(Failure(status, message, param))


def install_error_handlers(app: FastAPI) -> None:
    async def _failed(_: Request, exc: Exception) -> JSONResponse:
        return failure_response(failure(exc))

    for kind in (InvalidRequest, NotReady, EngineError):  # EngineOverloaded is an EngineError
        app.add_exception_handler(kind, _failed)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        return failure_response(
            Failure(400, f"{where}: {first.get('msg', 'invalid value')}", loc[0] if loc else None)
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up while its body was being read: nobody to answer, nothing went wrong.
        log.info("client went away while sending its request to %s", request.url.path)
        return Response(status_code=499)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return failure_response(Failure(exc.status_code, str(exc.detail)), dict(exc.headers or {}))
