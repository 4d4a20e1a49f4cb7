"""Serve the WebUI under /webui/ of the service's app, and send browsers from `GET /` to it.

    mount_webui(app, state)   # in create_app, with the app's ServiceState

Gradio needs about a second of CPU to build the page (its Blocks create several FastAPI apps), so
the page is built at the first /webui/ request, not with the app: API-only work and the test
suite's many apps do not pay for it. With a service token the page asks for it (any user name, the
token as the password, compared in constant time) and `WebUIGate` refuses every other /webui/
request until the browser has logged in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from easllm.server.errors import error_response
from easllm.server.state import ServiceState
from easllm.webui.app import CSS, build_blocks, token_checker
from easllm.webui.gate import WebUIGate

log = logging.getLogger(__name__)

WEBUI_PATH = "/webui"
AUTH_MESSAGE = "This service needs its token: enter any user name and the token as the password."


class LazyWebUI:
    """The ASGI app mounted at /webui: builds and starts the Gradio app at its first request."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.blocks: gr.Blocks | None = None
        self._app: ASGIApp | None = None
        self._lock: asyncio.Lock | None = None
        self._stack = AsyncExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._app or await self.start()
        await app(scope, receive, send)

    async def start(self) -> ASGIApp:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._app is None:
                started = asyncio.get_running_loop().time()
                container, blocks, gradio_app = await asyncio.to_thread(self._build)
                # The container's lifespan is Gradio's: it starts the queue and the cleanup tasks.
                await self._stack.enter_async_context(container.router.lifespan_context(container))
                self._stack.callback(blocks.close, verbose=False)
                self.blocks = blocks
                token = self.state.config.token
                failures = self.state.failed_tokens
                self._app = WebUIGate(gradio_app, gradio_app, token, failures) if token else gradio_app
                log.info("WebUI built in %.2f s", asyncio.get_running_loop().time() - started)
        assert self._app is not None
        return self._app

    def _build(self) -> tuple[FastAPI, gr.Blocks, Any]:
        config = self.state.config
        blocks = build_blocks(self.state)
        container = FastAPI()
        gr.mount_gradio_app(
            container,
            blocks,
            path=WEBUI_PATH,
            auth=token_checker(config.token) if config.token else None,
            auth_message=AUTH_MESSAGE,
            footer_links=["settings"],
            run_history=False,
            ssr_mode=False,
            mcp_server=False,
            enable_monitoring=False,
            show_error=True,
            max_file_size=int(config.knowledge.max_file_mb * 1024 * 1024),
            css=CSS,
        )
        for route in container.routes:
            if isinstance(route, Mount) and route.path == WEBUI_PATH:
                return container, blocks, route.app
        raise RuntimeError("Gradio did not mount the WebUI")

    async def close(self) -> None:
        """Stop Gradio's queue and tasks; a later request (a new event loop) builds the page again."""
        await self._stack.aclose()
        self._stack = AsyncExitStack()
        self._app = None
        self._lock = None
        self.blocks = None


def mount_webui(app: FastAPI, state: ServiceState) -> LazyWebUI:
    config = state.config
    webui = LazyWebUI(state)
    state.webui = webui
    app.mount(WEBUI_PATH, webui)
    outer = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with outer(a) as state:
            try:
                yield state
            finally:
                await webui.close()

    app.router.lifespan_context = lifespan

    @app.get("/", include_in_schema=False, response_model=None)
    async def root(request: Request) -> Response:
        """Browsers (and every client when the API is off) go to the WebUI; the API is POST /."""
        if config.no_api or "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"{request.scope.get('root_path', '')}{WEBUI_PATH}/", status_code=307)
        return error_response(405, "GET / opens the WebUI in a browser; send API requests with POST /")

    return webui
