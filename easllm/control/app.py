"""`create_console_app(config)`: registry + controller (and its runtimes) + gateway + REST API +
page, on one port."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from easllm import __version__
from easllm.config import LimitsConfig, ServerConfig
from easllm.control import api, gateway, page
from easllm.control.config import ConsoleConfig
from easllm.control.controller import Controller
from easllm.control.registry import Registry, UnknownService
from easllm.control.routing import RoutingTable
from easllm.logs import redact_secrets
from easllm.server.abuse import AbuseThrottle, RefusalBudget
from easllm.server.auth import serve_openapi
from easllm.server.browser import BrowserGuard
from easllm.server.errors import error_response, install_error_handlers
from easllm.server.limits import RequestLimits
from easllm.server.lockout import FailedTokens

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 2048  # HTTP requests in progress plus relayed WebSockets, over all services


@dataclass
class Console:
    """What the routes reach through `app.state.console`."""

    config: ConsoleConfig
    registry: Registry
    controller: Controller
    routing: RoutingTable
    http: httpx.AsyncClient


def create_console_app(config: ConsoleConfig, registry: Registry | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry or Registry(config.database_url)
        redact_secrets()  # the gateway's WebUI and WebSocket clients pass ?token= in URLs uvicorn logs
        controller = Controller(config, reg)
        http = gateway.new_http_client()
        app.state.console = Console(config, reg, controller, controller.routing, http)
        await controller.open()
        log.info("console on %s (database %s)", config.gateway_url, reg.url)
        print(f"easllm console: ready on {config.gateway_url}/", flush=True)
        try:
            yield
        finally:
            await controller.close()
            await http.aclose()
            if registry is None:
                reg.close()

    app = FastAPI(
        title="easllm console",
        version=__version__,
        description="Deploy, list, describe, update, stop, start and delete named LLM services.",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind the admin token
        docs_url=None,  # Swagger and ReDoc pages load their scripts from a CDN
        redoc_url=None,
    )
    # Bodies bound for a service get that service's default limits (it applies its own as well).
    limits = ServerConfig(limits=LimitsConfig(max_connections=MAX_CONNECTIONS))
    app.add_middleware(RequestLimits, config=limits, path_of=gateway.service_path)
    public_host = urlsplit(config.public_url).netloc if config.public_url else ""
    hosts = ((public_host,) if public_host else ()) + config.allowed_hosts
    app.add_middleware(BrowserGuard, bind_host=config.host, allowed_hosts=hosts)
    # Outermost: a client whose requests (its services' answers included) keep being refused waits
    # here, before it holds a connection slot or reaches a replica.
    app.state.refusals = RefusalBudget.from_config(limits.limits)
    app.add_middleware(AbuseThrottle, budget=app.state.refusals)
    app.state.failed_tokens = FailedTokens()
    install_error_handlers(app)
    serve_openapi(app, api.require_admin)

    @app.exception_handler(UnknownService)
    async def _unknown(_: Request, exc: UnknownService) -> JSONResponse:
        return error_response(404, f"no service named {exc}")

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, object]:
        return {"status": "ok", "services": len(app.state.console.routing.routes)}

    app.include_router(api.router)
    app.include_router(gateway.router)
    app.include_router(page.router)
    return app
