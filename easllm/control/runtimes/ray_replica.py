"""What runs inside each Ray Serve replica: the same app and engine as `easllm serve`.

A replica gets the `easllm serve` flags the local runtime would use, builds the engine and
`create_app(config, engine)` in its own process, and tells Serve it is ready only once the model
has loaded (so a rolling update never routes to a replica that would answer 503). Imported by
Ray workers by module path: keep it importable without Ray, and free of console state.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from dataclasses import replace
from typing import Any

log = logging.getLogger(__name__)
REPLICA_HEADER = b"x-easllm-replica"
Scope = dict[str, Any]


def build_service_app(argv: list[str], token: str | None) -> Any:
    """`easllm serve ARGV` as an ASGI app (no socket: Serve's proxy is the front door)."""
    from easllm.app import create_app
    from easllm.config import easllm_home
    from easllm.engine.factory import build_engine
    from easllm.logs import configure_logging
    from easllm.models.resolve import resolve_configured
    from easllm.serve_config import configs_from
    from easllm.serve_flags import serve_parser

    server, engine_config = configs_from(serve_parser().parse_args(argv))
    server = replace(server, token=token or None)
    configure_logging(server.log_level, server.log_format)
    model = None
    if engine_config.engine != "fake":
        model = resolve_configured(engine_config, easllm_home(), lambda m: log.info("%s", m))
    return create_app(server, build_engine(engine_config, model))


class ReadyWhenLoaded:
    """ASGI wrapper: lifespan startup completes when the model is loaded (or fails with its error),
    and each HTTP answer names the replica that gave it (`x-easllm-replica`)."""

    def __init__(self, app: Any, replica: str, load_timeout: float) -> None:
        self.app = app
        self.replica = replica.encode()
        self.load_timeout = load_timeout

    def add_exception_handler(self, *args: Any) -> None:  # Serve registers its own errors here
        self.app.add_exception_handler(*args)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._when_loaded(send))
        elif scope["type"] == "http":
            await self.app(scope, receive, self._named(send))
        else:
            await self.app(scope, receive, send)

    def _when_loaded(self, send: Any) -> Any:
        async def send_when_loaded(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                error = await self._loaded()
                if error is not None:
                    message = {"type": "lifespan.startup.failed", "message": error}
            await send(message)

        return send_when_loaded

    async def _loaded(self) -> str | None:
        from easllm.server.state import state_of

        state = state_of(self.app)
        deadline = time.monotonic() + self.load_timeout
        while not state.engine.health().ready:
            if state.load_error:
                return f"the model failed to load: {state.load_error}"
            if time.monotonic() > deadline:
                return f"the model did not load within {self.load_timeout:.0f}s"
            await asyncio.sleep(0.1)
        return None

    def _named(self, send: Any) -> Any:
        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)],
                }
            await send(message)

        return send_named


class ServiceReplica:
    """The Serve deployment class (wrapped by `serve.ingress()` in runtimes/ray.py)."""

    def __init__(self, argv: list[str], token: str | None, load_timeout: float) -> None:
        self.argv = argv
        self.token = token
        self.load_timeout = load_timeout

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        print(f"easllm: replica {replica} starting: easllm serve {' '.join(self.argv)}", file=sys.stderr)
        name = re.sub(r"[^A-Za-z0-9_-]", "_", f"ray-{replica}")[:64]  # its history export files
        argv = [*self.argv, "--replica-name", name]
        return ReadyWhenLoaded(build_service_app(argv, self.token), replica, self.load_timeout)

    async def check_health(self) -> None:
        """Serve replaces a replica whose check fails. Checks start after the model loaded, so
        an engine that is not ready now has died."""
        from easllm.server.state import state_of

        state = state_of(self.app.app)  # type: ignore[attr-defined]  # Serve's wrapper -> ReadyWhenLoaded
        if state.load_error:
            raise RuntimeError(f"the model failed to load: {state.load_error}")
        health = state.engine.health()
        if not health.ready:
            raise RuntimeError(f"the {health.engine} engine is not ready: {health.details}")
