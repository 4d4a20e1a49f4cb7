"""The typed state of one service's app, built once in `create_api_app`; routes get it with
`Depends(service_state)`. This module is the only one that stores or loads it on the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request

from easllm.config import ServerConfig
from easllm.engine.base import Engine
from easllm.export.exporter import HistoryExporter
from easllm.rag.embedder import SharedEmbedder
from easllm.rag.knowledge import KnowledgeBase
from easllm.server.abuse import RefusalBudget
from easllm.server.access_log import request_info
from easllm.server.lockout import FailedTokens
from easllm.server.metrics import ServiceMetrics
from easllm.server.pending import PendingBytes
from easllm.serving.caller import Caller
from easllm.serving.chat import ChatServing
from easllm.serving.observe import EngineWatch, RoundObserver


@dataclass
class ServiceState:
    config: ServerConfig
    engine: Engine
    embedder: SharedEmbedder
    knowledge: KnowledgeBase
    chat: ChatServing
    history: HistoryExporter | None
    metrics: ServiceMetrics
    observer: RoundObserver
    engine_watch: EngineWatch
    ws_pending: PendingBytes
    failed_tokens: FailedTokens
    refusals: RefusalBudget | None  # the abuse throttle's buckets; None: --abuse-rate 0
    load_error: str | None = None  # why the model failed to load
    webui: Any = None  # webui.mount.LazyWebUI once mounted (imports Gradio)


def attach_state(app: Starlette, state: ServiceState) -> None:
    app.state.service = state


def state_of(app: Starlette) -> ServiceState:
    state: ServiceState = app.state.service
    return state


def service_state(conn: HTTPConnection) -> ServiceState:
    """The FastAPI dependency behind `State`."""
    return state_of(conn.app)


State = Annotated[ServiceState, Depends(service_state)]  # a route's `state: State` parameter


def http_caller(request: Request) -> Caller:
    """An HTTP request as the serving layer sees it: its round starts at its arrival."""
    info = request_info(request)
    return Caller(
        info=info,
        client=request.client.host if request.client else None,
        arrived=info.started if info is not None else None,
        is_disconnected=request.is_disconnected,
    )


def websocket_caller(websocket: HTTPConnection) -> Caller:
    """A WebSocket connection: one session, each round timed from its own message."""
    info = request_info(websocket)
    client = websocket.client.host if websocket.client else None
    return Caller(info=info, client=client, session=info.request_id if info is not None else None)
