"""`/api/predict/<service>[/...]`: one port in front of every service's replicas.

HTTP is passed through byte for byte as the replica sends it (NUL-delimited and SSE streams are
never buffered); request bodies are held in memory only up to `RETRY_BODY_BYTES` (so a request
can be repeated on another replica), larger or chunked ones are streamed through and not retried;
WebSocket messages are relayed both ways. The service token is checked here
(`Authorization`, `?token=`, or the cookie a `?token=` sets for the WebUI) and replaced by the
replica's own. A browser's WebUI session stays on one replica (the `easllm_replica` cookie names
it; it moves only when that replica no longer serves); a generation request goes to the replica
its conversation's key hashes to, within a load bound (routing.py, affinity.py); the rest to the
replica with the fewest requests in flight. A Ray service has one endpoint here, Serve's proxy:
the gateway names the session or conversation in Serve's `serve_multiplexed_model_id` header and
Serve's router for the service maps it onto the same ring (runtimes/ray_router.py). If a
replica cannot be reached, the request goes to another; if one dies before answering, requests
that are safe to repeat (generation, GETs) are retried elsewhere; a stream cut mid-way ends with
an error chunk in the stream's own format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any
from urllib.parse import urlencode

import httpx
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from easllm.control.affinity import conversation_key
from easllm.control.routing import NoReplica, ReplicaState, RoutingTable, ServiceRoute, gateway_prefix
from easllm.server.auth import check_token
from easllm.server.errors import error_body, error_response
from easllm.server.lockout import FailedTokens, busy_message

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
Suspect = Callable[[ReplicaState], None]  # tells the replica's runtime that it failed a request
COOKIE = "easllm_token"
REPLICA_COOKIE = "easllm_replica"  # session affinity: the id of the replica a browser stays on
GATEWAY_COOKIES = {COOKIE, REPLICA_COOKIE}  # never passed on to replicas
SERVE_AFFINITY_HEADER = "serve_multiplexed_model_id"  # Ray Serve routes equal values to one replica
SESSION = re.compile(r"s[0-9a-f]{24}")  # a browser session's name, for services Serve routes
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "cookie",
    "content-length",
}
DROP_FROM_REPLY = {"connection", "keep-alive", "transfer-encoding", "server", "date"}
RETRY_SAFE_POSTS = {"", "v1/chat/completions", "v1/completions", "v1/embeddings"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_TRY_AGAIN = 1001, 1011, 1013
RETRY_BODY_BYTES = 1024 * 1024  # a generation request is far smaller; uploads are streamed through
PREFIX = "/api/predict/"


def service_path(scope: MutableMapping[str, Any]) -> str:
    """The path a replica sees: `/api/predict/<service>/v1/models` -> `/v1/models` (others unchanged)."""
    path = str(scope.get("path", ""))
    if not path.startswith(PREFIX):
        return path
    rest = path[len(PREFIX) :].partition("/")[2]
    return "/" + rest


def new_http_client() -> httpx.AsyncClient:
    # keep-alive shorter than uvicorn's 5 s, so a pooled connection is never closed under a request
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200, keepalive_expiry=2.0)
    timeout = httpx.Timeout(connect=5.0, read=None, write=60.0, pool=30.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, follow_redirects=False)


def _presented_token(headers: object, query: object, cookies: dict[str, str]) -> tuple[str | None, bool]:
    """(token, came from ?token=) from Authorization, the query string or the WebUI cookie."""
    auth = headers.get("authorization")  # type: ignore[attr-defined]
    if auth:
        return auth, False
    if query.get("token"):  # type: ignore[attr-defined]
        return query.get("token"), True  # type: ignore[attr-defined]
    return cookies.get(COOKIE), False


async def _token_refusal(
    failures: FailedTokens, client: object, expected: str, presented: str | None
) -> tuple[int, str] | None:
    """None when the token is right; else (status, message) of the refusal."""
    verdict = await check_token(failures, getattr(client, "host", None), expected, presented)
    if verdict == 200:
        return None
    if verdict == 429:
        return 429, busy_message()
    return 401, "missing or wrong token for service {service}"


def _retry_safe(method: str, path: str) -> bool:
    return method in ("GET", "HEAD", "OPTIONS") or (method == "POST" and path.strip("/") in RETRY_SAFE_POSTS)


def _broken_stream_chunk(content_type: str, message: str) -> bytes:
    body = error_body(502, message)
    if content_type.startswith("text/event-stream"):
        return f"data: {json.dumps(body)}\n\n".encode()
    if content_type.startswith("application/octet-stream"):  # EAS NUL-delimited JSON chunks
        return json.dumps(body).encode() + b"\0"
    return b""


@router.api_route("/api/predict/{service}", methods=METHODS)
@router.api_route("/api/predict/{service}/{path:path}", methods=METHODS)
async def predict(request: Request, service: str, path: str = "") -> Response:
    console = request.app.state.console
    routing: RoutingTable = console.routing
    route = routing.route(service)
    if route is None:
        return error_response(404, f"no service named {service}")
    token, from_query = _presented_token(request.headers, request.query_params, request.cookies)
    refusal = await _token_refusal(request.app.state.failed_tokens, request.client, route.token, token)
    if refusal is not None:
        return error_response(refusal[0], refusal[1].format(service=service))
    declared = request.headers.get("content-length", "")
    small = declared.isdigit() and int(declared) <= RETRY_BODY_BYTES
    body: bytes | None = await request.body() if small or request.method in ("GET", "HEAD") else None
    headers = [
        (k, v)
        for k, v in request.headers.items()
        if k.lower() not in HOP_BY_HOP
        and not k.lower().startswith("x-forwarded-")  # the gateway's own, below, are the ones replicas trust
        and k.lower().replace("-", "_") != SERVE_AFFINITY_HEADER
    ]
    if body is None and declared.isdigit():  # streamed: the replica still sees the size up front
        headers.append(("content-length", declared))
    cookies = "; ".join(f"{k}={v}" for k, v in request.cookies.items() if k not in GATEWAY_COOKIES)
    if cookies:  # the WebUI's own session cookies; the gateway's cookie stays here
        headers.append(("cookie", cookies))
    prefix = gateway_prefix(service)
    headers += [
        ("authorization", route.token),
        ("x-forwarded-for", request.client.host if request.client else ""),
        ("x-forwarded-host", request.headers.get("host", "")),
        ("x-forwarded-proto", request.url.scheme),
        ("x-forwarded-prefix", prefix),
    ]
    query = request.url.query
    retry_safe = body is not None and _retry_safe(request.method, path)
    key = conversation_key(path, body) if request.method == "POST" and body is not None else None
    pinned = pinned_replica(request.cookies)
    affinity = request.cookies.get(REPLICA_COOKIE, "")
    browser = _browser_session(request.method, path, affinity)
    tried: set[int] = set()
    while True:
        try:
            replica = routing.pick(service, tried, key, pinned)
        except NoReplica as exc:
            if tried:
                return error_response(502, f"service {service}: no replica could answer ({len(tried)} tried)")
            return error_response(503, str(exc))
        tried.add(replica.id)
        replica.outstanding += 1
        replica.served += 1
        url = f"{replica.url}/{path}" + (f"?{query}" if query else "")
        session = affinity_cookie(replica, affinity) if browser else None
        sent = headers + serve_affinity(replica, session, key)
        content = body if body is not None else request.stream()
        upstream_request = console.http.build_request(request.method, url, headers=sent, content=content)
        try:
            upstream = await console.http.send(upstream_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            _give_back(replica, console.controller.suspect, f"unreachable: {exc!r}")
            continue
        except httpx.HTTPError as exc:
            if body is None:  # a streamed body: the replica may have refused it (413) and closed
                replica.outstanding -= 1
                log.info("%s: replica %d stopped reading a streamed body: %r", service, replica.id, exc)
                return error_response(502, f"service {service}: the replica did not take the whole body")
            _give_back(replica, console.controller.suspect, f"failed mid-request: {exc!r}")
            if retry_safe:
                continue
            return error_response(502, f"service {service}: the replica failed during the request")
        except BaseException:
            replica.outstanding -= 1
            raise
        reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_FROM_REPLY}
        response = StreamingResponse(
            _relay(upstream, replica, console.controller.suspect),
            status_code=upstream.status_code,
            headers=reply_headers,
        )
        if from_query and token:
            response.set_cookie(COOKIE, token, path=prefix, httponly=True, samesite="lax")
        if session is not None and session != affinity:
            response.set_cookie(REPLICA_COOKIE, session, path=prefix, httponly=True, samesite="lax")
        return response


def pinned_replica(cookies: dict[str, str]) -> int | None:
    """The replica id the affinity cookie names (None when absent or not a plain number)."""
    value = cookies.get(REPLICA_COOKIE, "")
    return int(value) if value.isdecimal() and len(value) <= 12 else None


def _browser_session(method: str, path: str, affinity: str) -> bool:
    """The WebUI's requests (and a browser's `GET /`, which leads to it) are pinned; so is any
    request of a session already pinned. API clients are never pinned."""
    path = path.strip("/")
    return bool(affinity) or path == "webui" or path.startswith("webui/") or (path == "" and method == "GET")


def affinity_cookie(replica: ReplicaState, affinity: str) -> str:
    """What the affinity cookie should hold once `replica` answers: its id; or, where Serve picks
    the replica, the session's name (kept, or a new one)."""
    if replica.affinity_by_header:
        return affinity if SESSION.fullmatch(affinity) else f"s{secrets.token_hex(12)}"
    return str(replica.id)


def serve_affinity(replica: ReplicaState, session: str | None, key: str | None) -> list[tuple[str, str]]:
    """The header that tells Ray Serve which requests belong together: the browser session, else
    the conversation. None for replicas the gateway picks itself."""
    if not replica.affinity_by_header:
        return []
    if session:
        return [(SERVE_AFFINITY_HEADER, f"session:{session}")]
    return [(SERVE_AFFINITY_HEADER, f"conversation:{key}")] if key else []


def _give_back(replica: ReplicaState, suspect: Suspect, why: str) -> None:
    replica.outstanding -= 1
    suspect(replica)
    log.warning("%s: replica %d %s", replica.service, replica.id, why)


async def _relay(upstream: httpx.Response, replica: ReplicaState, suspect: Suspect) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        suspect(replica)
        log.warning("%s: replica %d broke a stream: %r", replica.service, replica.id, exc)
        if "content-length" not in upstream.headers:
            tail = _broken_stream_chunk(
                upstream.headers.get("content-type", ""), "the replica failed mid-stream"
            )
            if tail:
                yield tail
    finally:
        replica.outstanding -= 1
        await upstream.aclose()


@router.websocket("/api/predict/{service}")
@router.websocket("/api/predict/{service}/{path:path}")
async def predict_socket(websocket: WebSocket, service: str, path: str = "") -> None:
    console = websocket.app.state.console
    routing: RoutingTable = console.routing
    route = routing.route(service)
    if route is None:
        await _deny(websocket, 404, f"no service named {service}")
        return
    token, _ = _presented_token(websocket.headers, websocket.query_params, websocket.cookies)
    refusal = await _token_refusal(websocket.app.state.failed_tokens, websocket.client, route.token, token)
    if refusal is not None:
        await _deny(websocket, refusal[0], refusal[1].format(service=service))
        return
    upstream, replica = await _connect_upstream(
        websocket, route, routing, console.controller.suspect, path, pinned_replica(websocket.cookies)
    )
    if upstream is None or replica is None:
        return
    try:
        await websocket.accept(subprotocol=upstream.subprotocol)
        await _pump(websocket, upstream)
    finally:
        replica.outstanding -= 1
        await upstream.close()


async def _connect_upstream(
    websocket: WebSocket,
    route: ServiceRoute,
    routing: RoutingTable,
    suspect: Suspect,
    path: str,
    pinned: int | None = None,
) -> tuple[ClientConnection | None, ReplicaState | None]:
    query = urlencode([(k, v) for k, v in websocket.query_params.multi_items() if k != "token"])
    protocols = [
        p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
    ]
    tried: set[int] = set()
    while True:
        try:
            replica = routing.pick(route.name, tried, pinned=pinned)
        except NoReplica as exc:
            await _deny(websocket, 502 if tried else 503, str(exc))
            return None, None
        tried.add(replica.id)
        replica.outstanding += 1
        replica.served += 1
        url = replica.url.replace("http", "ws", 1) + f"/{path}" + (f"?{query}" if query else "")
        try:
            upstream = await connect(
                url,
                additional_headers={
                    "Authorization": route.token,
                    # the client's own address, so a replica's per-client limits see each client
                    "X-Forwarded-For": websocket.client.host if websocket.client else "",
                },
                subprotocols=protocols or None,  # type: ignore[arg-type]
                open_timeout=10,
                max_size=None,
                ping_interval=None,
            )
            return upstream, replica
        except InvalidStatus as exc:
            replica.outstanding -= 1
            status = exc.response.status_code
            await _deny(
                websocket, status, exc.response.body.decode(errors="replace") or f"replica answered {status}"
            )
            return None, None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            _give_back(replica, suspect, f"refused a WebSocket: {exc!r}")


async def _pump(websocket: WebSocket, upstream: ClientConnection) -> None:
    async def client_to_upstream() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code", 1000))
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])

    async def upstream_to_client() -> None:
        try:
            async for message in upstream:
                if isinstance(message, str):
                    await websocket.send_text(message)
                else:
                    await websocket.send_bytes(message)
        except ConnectionClosed:
            pass
        received = upstream.protocol.close_rcvd
        if received is None:  # the replica vanished without a close frame
            await websocket.close(CLOSE_INTERNAL, "the replica failed")
        else:
            await websocket.close(received.code, received.reason)

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(
                result, WebSocketDisconnect | ConnectionClosed | RuntimeError
            ):
                log.warning("websocket relay: %r", result)


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(status, message))
    else:
        await websocket.close(CLOSE_TRY_AGAIN if status == 503 else 1008, message[:120])
