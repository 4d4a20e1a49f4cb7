"""Start a service app over an engine in FastAPI's TestClient and wait until it is ready."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from easllm.app import create_app
from easllm.config import ServerConfig
from easllm.engine.base import Engine


@contextmanager
def serving(config: ServerConfig, engine: Engine) -> Iterator[TestClient]:
    """The app for `config` over `engine` in a TestClient, once its engine is ready."""
    with TestClient(create_app(config, engine)) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


@contextmanager
def start(engine: Engine, **config: object) -> Iterator[TestClient]:
    with serving(ServerConfig(**config), engine) as client:  # type: ignore[arg-type]
        yield client
