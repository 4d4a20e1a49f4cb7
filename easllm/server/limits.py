"""What one client may ask of a server, enforced at the ASGI edge before any route runs.

`RequestLimits` wraps the whole app (API, WebUI, probes):

- **Concurrency**: at most `max_connections` HTTP requests in progress plus open WebSockets;
  one more is answered `503` with `Retry-After` (a WebSocket handshake is denied the same way,
  or closed with 1013 "try again later" where the server cannot send a denial). Probes are never
  counted nor refused, so a saturated server still reports its health.
- **Body size**: a body over the limit is answered `413` naming the limit: at once when its
  `Content-Length` says so, otherwise as soon as the bytes read exceed it (chunked uploads). The
  app then sees the client as gone; nothing it sends afterwards reaches the wire. Knowledge-base
  uploads (and the WebUI, which uploads files too) may carry `max_upload_files` files of
  `--kb-max-file-mb` each; every other body is limited by `--max-body-mb`. On a service with a
  token, WebUI requests without a session (the login page among them) get `LOGIN_BODY_LIMIT`.
- **Slow bodies**: an ordinary body must arrive within `body_timeout` seconds, and an upload may
  not pause longer than that between two pieces; beyond it `408`, so slow clients cannot hold
  every connection slot.

WebSocket message sizes and queues are limited by the WebSocket route itself (it answers an
oversized message with an error and keeps the connection), and by uvicorn's `ws_max_size` as
the transport's hard cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easllm.config import ServerConfig
from easllm.errors import Failure
from easllm.server.errors import failure_headers

log = logging.getLogger(__name__)

MB = 1024 * 1024
PROBES = frozenset({"/live", "/health", "/ready", "/metrics"})
UPLOAD_PATHS = ("/v1/knowledge/files",)
UPLOAD_PREFIXES = ("/webui/", "/webui")
MULTIPART_SLACK = MB  # part headers and boundaries around the files themselves
LOGIN_BODY_LIMIT = 64 * 1024  # a WebUI request before its login: the login form, small API calls
LOGIN_PATHS = ("/login", "/gradio_api/login_check")
CLOSE_TRY_AGAIN = 1013


def body_limit(config: ServerConfig) -> int:
    """Bytes of an ordinary request body (and of one WebSocket message)."""
    return int(config.limits.max_body_mb * MB)


def upload_limit(config: ServerConfig) -> int:
    """Bytes of one knowledge-base upload: max_upload_files files of --kb-max-file-mb each."""
    per_file = int(config.knowledge.max_file_mb * MB)
    return max(body_limit(config), per_file * config.limits.max_upload_files + MULTIPART_SLACK)


def app_path(scope: Scope) -> str:
    """The path below the service's root path (a proxy's prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class RequestLimits:
    """`path_of(scope)` is the path the rules above see (below a proxy's prefix, by default)."""

    def __init__(
        self, app: ASGIApp, config: ServerConfig, path_of: Callable[[Scope], str] | None = None
    ) -> None:
        self.app = app
        self.path_of = path_of or app_path
        self.max_connections = config.limits.max_connections
        self.body_limit = body_limit(config)
        self.upload_limit = upload_limit(config)
        self.body_mb = config.limits.max_body_mb
        self.body_timeout = config.limits.body_timeout
        self.webui_needs_login = bool(config.token)
        self.active = 0  # HTTP requests in progress plus open WebSockets (probes excluded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = self.path_of(scope)
        if path in PROBES:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_connections:
            await self._refuse_busy(scope, send)
            return
        self.active += 1
        try:
            if kind == "http":
                await self._http(scope, receive, send, path)
            else:
                await self.app(scope, receive, send)
        finally:
            self.active -= 1

    def _limit_for(self, scope: Scope, path: str) -> tuple[int, str, bool]:
        """(bytes, the flag that sets them, whether it is an upload) for this request's body."""
        if (
            path.startswith(UPLOAD_PREFIXES)
            and self.webui_needs_login
            and not _has_webui_session(scope, path)
        ):
            return LOGIN_BODY_LIMIT, "before logging in to the WebUI", False
        if (scope.get("method") == "POST" and path in UPLOAD_PATHS) or path.startswith(UPLOAD_PREFIXES):
            return self.upload_limit, "--kb-max-file-mb x --max-upload-files", True
        return self.body_limit, "--max-body-mb", False

    async def _http(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        limit, flag, upload = self._limit_for(scope, path)
        declared = _content_length(scope)
        message = f"the request body is over the limit of {limit} bytes ({flag})"
        if declared is not None and declared > limit:
            await send_error(send, 413, f"{message}: Content-Length is {declared}", "body")
            return
        received = 0
        refused = False  # we answered 413 or 408: the app sees a vanished client, its replies are dropped
        started = False
        body_done = False
        deadline = None if upload else time.monotonic() + self.body_timeout

        async def refuse(status: int, text: str) -> Message:
            nonlocal refused
            refused = True
            if not started:
                log.info("refused a body on %s: %s", path, text)
                await send_error(send, status, text, "body")
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # later calls wait for a disconnect: no time limit
                return await receive()
            wait = self.body_timeout if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                msg = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                return await refuse(408, f"the request body did not arrive within {self.body_timeout:g} s")
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > limit:
                    return await refuse(413, message)
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            log.debug("the app gave up on a refused body", exc_info=True)

    async def _refuse_busy(self, scope: Scope, send: Send) -> None:
        text = (
            f"the server is at its limit of {self.max_connections} concurrent requests and WebSockets "
            "(--max-connections): retry later"
        )
        log.warning("refused a %s request: %d in progress", scope["type"], self.active)
        if scope["type"] == "http":
            await send_error(send, 503, text, None)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send_error(send, 503, text, None, prefix="websocket.")
        else:
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN, "reason": "server busy"})


async def send_error(
    send: Send,
    status: int,
    text: str,
    param: str | None,
    prefix: str = "",
    retry_after: int = 1,
    close: bool = False,
) -> None:
    """An error answered at the ASGI edge; `close`: the body is not read, the connection ends."""
    failed = Failure(status, text, param, retry_after)
    body = json.dumps(failed.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in failure_headers(failed).items()]
    if close or status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": f"{prefix}http.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": body})


def _has_webui_session(scope: Scope, path: str) -> bool:
    """A session cookie of Gradio's is present (the WebUI's gate checks it is a valid one)."""
    if path.rstrip("/").endswith(LOGIN_PATHS):
        return False
    return any(key == b"cookie" and b"access-token-" in value for key, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
