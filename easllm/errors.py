"""Typed errors of the core, and the one policy that maps any exception to what a client is told.

`failure(exc)` gives a `Failure` (status, type, message, param, retry_after) without knowing the
transport: HTTP replies, the SSE and NUL-delimited streams, the WebSocket and the WebUI all write
what it says (server/errors.py for HTTP, where Retry-After is set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request field is wrong: answered with 400 and the field named in `param`."""

    status = 400  # subclasses below answer with their own 4xx

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TooLarge(InvalidRequest):
    """An upload or body over a configured limit: answered with 413."""

    status = 413


class UnsupportedMedia(InvalidRequest):
    """A file type that is not accepted, or content that does not match its extension: 415."""

    status = 415


class Conflict(InvalidRequest):
    """The request cannot apply to the current state (e.g. an index built by another embedder): 409."""

    status = 409


class StorageFull(InvalidRequest):
    """The server's disk is full (or its quota spent): 507. Not the client's fault, but reported like
    a refusal (per file of an upload, naming the file) so the rest of a request still completes."""

    status = 507


class EngineError(RuntimeError):
    """A failure inside an engine (model load, decode): 500."""


class EngineOverloaded(EngineError):
    """The engine's queue is full: 503 with Retry-After."""


class NotReady(RuntimeError):
    """The model is still loading: answered with 503."""


class StoreUnavailable(NotReady):
    """The knowledge base's database cannot be reached (or stays locked): answered with 503."""


class ModelNotFound(FileNotFoundError):
    """A model name or path that cannot be resolved on this machine."""


class ChecksumMismatch(RuntimeError):
    """A bundled model assembled from its packages does not match its published checksum."""


class PullFailed(ModelNotFound):
    """A model could not be fetched from its source: token, disk space, network, a missing file."""


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    507: "insufficient_storage",
}
RETRY_AFTER = 1  # seconds a client is asked to wait after a 429 or 503


@dataclass(frozen=True)
class Failure:
    """What a client is told about a request that failed: the same on every transport."""

    status: int
    message: str
    param: str | None = None
    retry_after: int | None = None  # seconds; 429 and 503 get RETRY_AFTER unless told otherwise
    type: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", ERROR_TYPES.get(self.status, "server_error"))
        if self.status in (429, 503) and self.retry_after is None:
            object.__setattr__(self, "retry_after", RETRY_AFTER)

    def body(self) -> dict[str, object]:
        """The JSON error object every API answers with (OpenAI's shape)."""
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


def failure(exc: BaseException) -> Failure:
    """The one mapping of an exception to a client's answer; an unexpected one is logged here."""
    if isinstance(exc, InvalidRequest):
        return Failure(exc.status, exc.message, exc.param)
    if isinstance(exc, NotReady | EngineOverloaded):
        return Failure(503, str(exc))
    if isinstance(exc, EngineError):
        log.error("engine error: %s", exc)
        return Failure(500, str(exc))
    log.error("request failed", exc_info=exc)
    return Failure(500, f"internal error: {exc}")
