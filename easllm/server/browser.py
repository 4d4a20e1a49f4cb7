"""Guards against web pages a user visits: DNS rebinding (`Host`) and cross-site requests (`Origin`).

A page on another site can make the user's browser send requests to a server on the loopback,
and with DNS rebinding it can even read the answers. `BrowserGuard` wraps the app:

- On a server bound to the loopback, a request whose `Host` is not a loopback name
  (`localhost`, `127.0.0.1`, `[::1]`), the name the server was reached under, or one of
  `--allowed-hosts` is refused with 403 (naming `host`).
- A WebSocket handshake or a state-changing request (anything but GET/HEAD/OPTIONS) that carries
  an `Origin` other than the server's own (or its proxy's `X-Forwarded-Host`) is refused with 403
  unless `--cors-origin` allows it.

Clients that are not browsers send no `Origin` and a loopback `Host`; nothing changes for them.
A page cannot forge `X-Forwarded-Host`: a cross-site request with that header needs a CORS
preflight, which only `--cors-origin` answers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from easllm.server.limits import send_error

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """`Host` header -> the name without the port: `[::1]:8000` -> `::1`, `a.b:80` -> `a.b`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def origin_allowed(origin: str, own_hosts: Iterable[str], allowed_origins: Iterable[str]) -> bool:
    """The page's origin is this server's own (by host:port) or one `--cors-origin` names."""
    allowed = set(allowed_origins)
    if "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return True
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and netloc in {h.strip().lower() for h in own_hosts if h}


class BrowserGuard:
    def __init__(
        self,
        app: ASGIApp,
        bind_host: str,
        allowed_hosts: tuple[str, ...] = (),
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.check_host = is_loopback(bind_host) and "*" not in allowed_hosts
        self.hosts = LOOPBACK_HOSTS | {host_name(h) for h in allowed_hosts}
        self.cors_origins = cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", ()) if k in _WANTED}
        host = headers.get(b"host", "")
        if self.check_host and not self._host_allowed(scope, host):
            log.warning("refused a request for host %s (not in --allowed-hosts)", ascii(host[:100]))
            await _refuse(
                scope,
                send,
                f"the Host {host[:100]!r} is not served here: this server answers loopback names "
                "and those given with --allowed-hosts",
                "host",
            )
            return
        origin = headers.get(b"origin")
        state_changing = scope["type"] == "websocket" or scope.get("method") not in SAFE_METHODS
        own = (host, headers.get(b"x-forwarded-host", ""))
        if origin and state_changing and not origin_allowed(origin, own, self.cors_origins):
            log.warning("refused a cross-site request from origin %s", ascii(origin[:100]))
            await _refuse(
                scope,
                send,
                f"requests from the page {origin[:100]!r} are refused "
                "(allowed origins are set with --cors-origin)",
                "origin",
            )
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, scope: Scope, host: str) -> bool:
        if not host:  # HTTP/1.0 without Host: not a browser
            return True
        name = host_name(host)
        server = scope.get("server")
        reached_as = str(server[0]).lower() if server else None  # the name the client connected to
        return name in self.hosts or name == reached_as


_WANTED = frozenset({b"host", b"origin", b"x-forwarded-host"})


async def _refuse(scope: Scope, send: Send, message: str, param: str) -> None:
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    prefix = "websocket." if scope["type"] == "websocket" else ""
    await send_error(send, 403, message, param, prefix=prefix)
