from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server, running_server


@pytest.fixture(scope="session")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The bundled base model on the llama.cpp engine, shared by the tests of a session."""
    tmp: Path = tmp_path_factory.mktemp("gemma")
    with running_server(
        ["--model-path", "gemma3-270m", "--max-new-tokens", "256", "--threads", "2"], tmp
    ) as server:
        yield server
