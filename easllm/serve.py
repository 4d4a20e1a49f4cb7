"""`easllm serve`: resolve the model, build the engine, run the app under uvicorn."""

from __future__ import annotations

import logging
import sys

from easllm.config import EngineConfig, ServerConfig, easllm_home
from easllm.engine.factory import EngineUnavailable, build_engine
from easllm.errors import ChecksumMismatch, ModelNotFound
from easllm.logs import configure_logging
from easllm.models.resolve import ResolvedModel, resolve_configured

log = logging.getLogger("easllm.serve")


def _progress(message: str) -> None:
    print(f"easllm: {message}", file=sys.stderr, flush=True)


def serve(server: ServerConfig, engine_config: EngineConfig) -> int:
    import uvicorn

    from easllm.app import create_app
    from easllm.server.limits import body_limit

    configure_logging(server.log_level, server.log_format)
    try:
        model: ResolvedModel | None = None
        if engine_config.engine != "fake":
            _progress(f"resolving model {engine_config.model_path}")
            model = resolve_configured(engine_config, easllm_home(), _progress)
            _progress(f"model file: {model.path}")
        engine = build_engine(engine_config, model)
    except (ModelNotFound, ChecksumMismatch, EngineUnavailable) as exc:
        _progress(f"error: {exc}")
        return 2
    if not server.token:
        log.warning("no --token (or EASLLM_TOKEN) given: this service is open to anyone who can reach it")
    app = create_app(server, engine)
    _progress(
        f"loading the model; listening on http://{server.host}:{server.port}/ (/health says when ready)"
    )
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to ours (text or JSON)
        access_log=False,  # the app logs one line per request itself (server/access_log.py)
        timeout_graceful_shutdown=5,
        root_path=server.root_path,
        # The WebSocket route answers a message over --max-body-mb with an error and keeps the
        # connection; twice that, the transport closes it (1009) before buffering any more.
        ws_max_size=2 * body_limit(server),
    )
    return 0
