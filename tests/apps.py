"""Start a service app over an engine in FastAPI's TestClient and wait until it is ready."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from easllm.config import ServerConfig
from easllm.engine.base import Engine
from easllm.server.app import create_app


@contextmanager
def start(engine: Engine, **config: object) -> Iterator[TestClient]:
    app = create_app(ServerConfig(**config), engine)  # type: ignore[arg-type]
    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client
