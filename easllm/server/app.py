"""`create_api_app(config, engine)`: one service's HTTP and WebSocket APIs (no WebUI), and its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from easllm import __version__
from easllm.config import ServerConfig
from easllm.engine.base import Engine
from easllm.export.exporter import HistoryExporter
from easllm.logs import redact_secrets
from easllm.rag.embedder import SharedEmbedder
from easllm.rag.knowledge import KnowledgeBase
from easllm.server.abuse import AbuseThrottle, RefusalBudget
from easllm.server.access_log import AccessLog
from easllm.server.auth import require_token, serve_openapi
from easllm.server.browser import BrowserGuard
from easllm.server.cors import ApiCORS
from easllm.server.errors import install_error_handlers
from easllm.server.limits import RequestLimits
from easllm.server.lockout import FailedTokens
from easllm.server.metrics import ServiceMetrics
from easllm.server.pending import PendingBytes
from easllm.server.routes import eas, health, knowledge, metrics, openai, websocket
from easllm.server.state import ServiceState, attach_state
from easllm.serving.chat import ChatServing
from easllm.serving.observe import EngineWatch, Progress, RoundObserver

log = logging.getLogger(__name__)


def create_api_app(config: ServerConfig, engine: Engine) -> FastAPI:
    """The model loads in the background after the socket is open; /health says when it is up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_secrets()  # whatever server runs the app, its logs never carry a ?token=
        loading = asyncio.create_task(_load(state))
        history = state.history
        if history is not None:
            history.start()
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await engine.close()
            if history is not None:  # the open period is exported now, not at the next start
                await asyncio.to_thread(history.close)
            state.knowledge.close()

    # No open /docs or /redoc (they load Swagger from a CDN); /openapi.json needs the token.
    app = FastAPI(
        title="easllm",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    state = _service_state(config, engine)
    attach_state(app, state)
    # The last added runs first: the access log sees every refusal of the limits and of CORS.
    app.add_middleware(RequestLimits, config=config)
    app.add_middleware(
        BrowserGuard,
        bind_host=config.host,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
    )
    if config.cors_origins:  # closed by default: no browser page of another origin reads a reply
        app.add_middleware(ApiCORS, origins=config.cors_origins)
    app.add_middleware(AbuseThrottle, budget=state.refusals)  # outside the limits: a wait holds no slot
    app.add_middleware(AccessLog, metrics=state.metrics)
    install_error_handlers(app)
    serve_openapi(app, require_token)
    app.include_router(health.router)
    app.include_router(metrics.router)
    if not config.no_api:
        app.include_router(eas.router)
        app.include_router(knowledge.router)
        app.include_router(openai.router)
        app.include_router(websocket.router)
    return app


def _service_state(config: ServerConfig, engine: Engine) -> ServiceState:
    embedder = SharedEmbedder(config.embedding_model)
    kb = KnowledgeBase(
        config.service_data_dir / "knowledge", embedder, config.knowledge, name=config.service_name
    )
    history = _history_exporter(config)
    service_metrics = ServiceMetrics(engine, kb, history)
    progress = Progress()
    observer = RoundObserver(config.service_name, engine, service_metrics, history, progress)
    chat = ChatServing(engine, config.max_round, config.no_template, kb, observer, config.tool_call_parser)
    return ServiceState(
        config=config,
        engine=engine,
        embedder=embedder,
        knowledge=kb,
        chat=chat,
        history=history,
        metrics=service_metrics,
        observer=observer,
        engine_watch=EngineWatch(progress),
        ws_pending=PendingBytes(),
        failed_tokens=FailedTokens(),
        refusals=RefusalBudget.from_config(config.limits),
    )


def _history_exporter(config: ServerConfig) -> HistoryExporter | None:
    """With --export-history-path: the write-ahead log stays on local disk, in the data dir."""
    if config.export_history_path is None:
        return None
    wal = config.service_data_dir / "history"
    return HistoryExporter(
        config.export_history_path, wal, config.export_interval, replica=config.replica_name or ""
    )


async def _load(state: ServiceState) -> None:
    engine, config = state.engine, state.config
    try:
        await engine.start()
    except Exception as exc:
        state.load_error = str(exc)
        log.exception("the model failed to load")
        return
    info = engine.model_info
    log.info("model %s ready (engine %s, context %d)", info.name, info.engine, info.context_length)
    print(f"easllm: ready on http://{config.host}:{config.port}/", flush=True)
    if info.chat_template is None:
        log.warning("model %s has no chat template: prompts are sent raw (--no-template)", info.name)
