"""`create_app(config, engine)`: one service's whole app, its APIs (server/) and its WebUI (webui/).

The two front ends share one `ServiceState`; the WebUI is mounted unless `--api-only`, and Gradio
is imported only then.
"""

from __future__ import annotations

from fastapi import FastAPI

from easllm.config import ServerConfig
from easllm.engine.base import Engine
from easllm.server.app import create_api_app
from easllm.server.state import state_of


def create_app(config: ServerConfig, engine: Engine) -> FastAPI:
    app = create_api_app(config, engine)
    if not config.api_only:
        from easllm.webui import mount_webui

        mount_webui(app, state_of(app))
    return app
