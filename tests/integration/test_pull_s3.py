"""`s3://bucket/prefix/` models against a local S3 (moto's server mode on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.servers import free_port, running_server

pytestmark = pytest.mark.integration
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
GGUF = b"GGUF" + bytes(range(256)) * 4000
GEMMA = Path(os.environ["EASLLM_HOME"]) / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], **_keys(env))
    client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="tiny-gguf/tiny-q4_k_m.gguf", Body=GGUF)
    try:
        yield env
    finally:
        server.stop()


def _keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def pull(url: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "easllm.cli", "pull", url]
    full = {**os.environ, **env, "EASLLM_HOME": str(home)}
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)


def test_pull_an_s3_prefix_once(s3_env: dict[str, str], tmp_path: Path) -> None:
    done = pull("s3://models/tiny-gguf/", s3_env, tmp_path)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path == tmp_path / "models/s3/models/tiny-gguf/tiny-q4_k_m.gguf" and path.read_bytes() == GGUF
    assert not list(path.parent.glob("*.partial"))
    mtime = path.stat().st_mtime_ns
    again = pull("s3://models/tiny-gguf", s3_env, tmp_path)
    assert again.returncode == 0 and path.stat().st_mtime_ns == mtime  # verified already: not fetched


def test_a_partial_object_resumes_and_a_corrupt_one_is_refused(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easllm.errors import ChecksumMismatch
    from easllm.models.s3 import plan_s3, pull_s3, s3_target

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    plan = plan_s3("s3://models/tiny-gguf/")
    target = s3_target(plan.repo_id, tmp_path)
    target.mkdir(parents=True)
    (target / "tiny-q4_k_m.gguf.etag").write_text(plan.files[0].etag or "")
    (target / "tiny-q4_k_m.gguf.partial").write_bytes(GGUF[:400_000])  # as left by a kill -9
    fetched: list[int] = []
    folder = pull_s3(plan, tmp_path, fetched.append)
    assert (folder / "tiny-q4_k_m.gguf").read_bytes() == GGUF and sum(fetched) == len(GGUF) - 400_000

    (target / ".easllm-pulled.json").unlink()
    (target / "tiny-q4_k_m.gguf").unlink()
    (target / "tiny-q4_k_m.gguf.partial").write_bytes(b"X" * len(GGUF))  # right size, wrong bytes
    with pytest.raises(ChecksumMismatch, match="MD5"):
        pull_s3(plan, tmp_path)
    assert not (target / "tiny-q4_k_m.gguf.partial").exists() and not (target / "tiny-q4_k_m.gguf").exists()


def test_a_missing_bucket_is_named(s3_env: dict[str, str], tmp_path: Path) -> None:
    done = pull("s3://no-such-bucket/x/", s3_env, tmp_path)
    assert done.returncode == 2 and "NoSuchBucket" in done.stderr


@pytest.mark.skipif(not GEMMA.is_file(), reason="the bundled gemma GGUF is not assembled")
def test_serve_an_s3_gguf_model(s3_env: dict[str, str], tmp_path: Path) -> None:
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], **_keys(s3_env))
    client.put_object(Bucket="models", Key="gemma/gemma-3-270m-q4_k_m.gguf", Body=GEMMA.read_bytes())
    args = ["--model-path", "s3://models/gemma/", "--threads", "2", "--api-only"]
    with running_server(args, tmp_path, env=s3_env | {"EASLLM_HOME": str(tmp_path / "home")}) as server:
        assert server.health()["engine"]["model"] == "gemma"
        answer = requests.post(
            f"{server.url}/v1/completions",
            json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
            headers=server.headers(),
            timeout=60,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"].strip()
    pulled = tmp_path / "home/models/s3/models/gemma/gemma-3-270m-q4_k_m.gguf"
    assert pulled.stat().st_size == GEMMA.stat().st_size


@pytest.mark.slow
def test_serve_an_s3_safetensors_model(s3_env: dict[str, str], tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny-llama")
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], **_keys(s3_env))
    for path in folder.iterdir():
        client.put_object(Bucket="models", Key=f"tiny-llama/{path.name}", Body=path.read_bytes())
    args = ["--model-path", "s3://models/tiny-llama/", "--engine", "transformers", "--precision", "fp32"]
    args += ["--cpu", "--api-only", "--max-new-tokens", "8"]
    with running_server(args, tmp_path, env=s3_env | {"EASLLM_HOME": str(tmp_path / "home")}) as server:
        health = server.health()
        assert health["engine"]["engine"] == "transformers" and health["engine"]["model"] == "tiny-llama"
        answer = requests.post(server.url, data="hello", headers=server.headers(), timeout=60)
        assert answer.status_code == 200
    assert (tmp_path / "home/models/s3/models/tiny-llama/config.json").is_file()
