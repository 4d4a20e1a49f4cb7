"""`--model-source modelscope` through ModelScope's own client, against a fake ModelScope on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_hub import FakeModelScope, running_hub

pytestmark = pytest.mark.integration
pytest.importorskip("modelscope")
GGUF = b"GGUF" + bytes(range(256)) * 2000


@pytest.fixture
def modelscope() -> Iterator[FakeModelScope]:
    fake = FakeModelScope()
    fake.add("qwen/Qwen2-7B-Instruct-GGUF", "qwen2-7b-instruct-q4_k_m.gguf", GGUF)
    fake.add("qwen/Qwen2-7B-Instruct-GGUF", "qwen2-7b-instruct-q8_0.gguf", GGUF + b"8")
    with running_hub(fake):
        yield fake  # type: ignore[misc]


def pull(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MODELSCOPE_ENDPOINT": url,
        "MODELSCOPE_CACHE": str(tmp / "ms"),
        "EASLLM_HOME": str(tmp / "home"),
    }
    cmd = [sys.executable, "-m", "easllm.cli", "pull", *args, "--model-source", "modelscope"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_a_modelscope_repository_by_quantization(modelscope: FakeModelScope, tmp_path: Path) -> None:
    done = pull(["qwen/Qwen2-7B-Instruct-GGUF:Q8_0"], modelscope.url, tmp_path)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.name == "qwen2-7b-instruct-q8_0.gguf" and path.read_bytes() == GGUF + b"8"
    assert str(tmp_path / "ms") in str(path)
    assert ("download", "qwen2-7b-instruct-q4_k_m.gguf") not in modelscope.requests


@pytest.mark.slow  # the client retries for ~7 s first
def test_a_missing_modelscope_repository_is_named(modelscope: FakeModelScope, tmp_path: Path) -> None:
    done = pull(["acme/Absent-GGUF:Q4_K_M"], modelscope.url, tmp_path)
    assert done.returncode == 2 and "acme/Absent-GGUF on ModelScope" in done.stderr
