"""The WebUI's door when the service has a token: only the login page passes without a session.

Gradio's own `auth` guards its data routes, but leaves some open (cancel, reset, heartbeat,
streams) and embeds its API description in the login page. This gate wraps the mounted Gradio
app and answers 401 to everything but the login page's shell (the HTML, its scripts, styles and
fonts, and the login call itself) until the browser holds a session cookie that Gradio issued
after a correct token. Fails closed: if Gradio's session store cannot be read, nobody passes.

A request that carries the service token in `Authorization` — as the console's gateway sends
every request it has checked (its `?token=` login) — is logged in already: the gate hands Gradio
a session of its own for it, so the browser is not asked a second time, and any replica behind
the gateway accepts the browser's next request. Wrong passwords count toward the client's failed
tokens (`server/lockout.py`): a client that keeps failing waits out a back-off before each answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easllm.server.auth import token_matches
from easllm.server.limits import send_error
from easllm.server.lockout import FailedTokens, busy_message

log = logging.getLogger(__name__)

# Route paths (below the mount) that the login page itself needs.
OPEN_EXACT = frozenset(
    {
        "",
        "/",
        "/login",
        "/login/",
        "/logout",
        "/logout/",
        "/theme.css",
        "/favicon.ico",
        "/robots.txt",
        "/manifest.json",
        "/gradio_api/login_check",
        "/gradio_api/login_check/",
    }
)
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/")


GATEWAY_USER = "gateway"
LOGIN_PATHS = frozenset({"/login", "/login/"})


class WebUIGate:
    def __init__(
        self, app: ASGIApp, gradio_app: object, token: str = "", failures: FailedTokens | None = None
    ) -> None:
        self.app = app
        self.gradio_app = gradio_app
        self.token = token
        self.failures = failures or FailedTokens()
        self._header_session = secrets.token_urlsafe(32)  # Gradio's session for token-bearing requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self._bears_token(scope):
            scope = self._with_session(scope)
        if scope["type"] == "http" and scope.get("method") == "POST" and route_path(scope) in LOGIN_PATHS:
            await self._login(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "log in to the WebUI first"})
            return
        await send_error(send, 401, "log in to the WebUI first (the service token is the password)", None)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Gradio checks the password (200 logged in, 400 wrong); a wrong one waits out the back-off."""
        client = scope["client"][0] if scope.get("client") else None
        if not self.failures.hold(client):
            await send_error(send, 429, busy_message(), None)
            return

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                wait = self.failures.delay(client)
                self.failures.failed(client)
                await asyncio.sleep(wait)
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.failures.release(client)

    def _bears_token(self, scope: Scope) -> bool:
        if not self.token:
            return False
        auth = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        return auth is not None and token_matches(auth.decode("latin-1"), self.token)

    def _with_session(self, scope: Scope) -> Scope:
        """The scope with Gradio's session cookie added (merged into the one Cookie header, the
        only one Starlette reads)."""
        tokens = getattr(self.gradio_app, "tokens", None)
        cookie_id = getattr(self.gradio_app, "cookie_id", None)
        if not isinstance(tokens, dict) or not cookie_id:
            return scope
        tokens[self._header_session] = GATEWAY_USER
        session = self._header_session
        ours = f"access-token-{cookie_id}={session}; access-token-unsecure-{cookie_id}={session}"
        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"cookie"]
        theirs = "; ".join(v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"cookie")
        headers.append((b"cookie", (f"{theirs}; {ours}" if theirs else ours).encode("latin-1")))
        return {**scope, "headers": headers}

    def _allowed(self, scope: Scope) -> bool:
        path = route_path(scope)
        if scope["type"] == "http" and (path in OPEN_EXACT or path.startswith(OPEN_PREFIXES)):
            return True
        return self._logged_in(scope)

    def _logged_in(self, scope: Scope) -> bool:
        tokens = getattr(self.gradio_app, "tokens", None)
        cookie_id = getattr(self.gradio_app, "cookie_id", None)
        if not isinstance(tokens, dict) or not cookie_id:
            log.error("webui gate: Gradio's session store is not readable; refusing")
            return False
        cookies = request_cookies(scope)
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            value = cookies.get(name)
            if value and value in tokens:
                return True
        return False


def route_path(scope: Scope) -> str:
    """The path below the mount point (Starlette keeps the full path and adds the mount to root_path)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :]
    return path


def request_cookies(scope: Scope) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            cookies.update(cookie_parser(value.decode("latin-1")))
    return cookies
