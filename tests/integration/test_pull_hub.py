"""`easllm pull` and `easllm serve --model-path ORG/REPO` against a fake Hugging Face Hub.

The CLI runs as a subprocess with HF_ENDPOINT pointing at the fake hub (tests/fake_hub.py) and a
private HF_HOME and EASLLM_HOME; nothing here reaches the internet.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.fake_hub import FakeHub, running_hub
from tests.servers import running_server

pytestmark = pytest.mark.integration
GGUF_REPO = "acme/Tiny-GGUF"
Q4 = "tiny-q4_k_m.gguf"
Q8 = "tiny-q8_0.gguf"
GEMMA = Path(os.environ["EASLLM_HOME"]) / "models" / "gemma-3-270m-q4_k_m.gguf"


def _payload(size: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return b"GGUF" + (block * (size // len(block) + 1))[: size - 4]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(GGUF_REPO, Q4, _payload(2_000_000, 1))
    fake.add(GGUF_REPO, Q8, _payload(3_000_000, 2))
    fake.add(GGUF_REPO, "README.md", b"# tiny\n")
    with running_hub(fake):
        yield fake


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
        "EASLLM_HOME": str(tmp_path / "home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def easllm(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "easllm.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_pull_a_quantization_then_offline_and_listed(hub: FakeHub, env: dict[str, str]) -> None:
    done = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.name == Q4 and path.read_bytes() == hub.repos[GGUF_REPO][Q4].content
    assert hub.downloads(Q4) == 1 and hub.downloads(Q8) == 0
    seen = len(hub.requests)
    offline = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env | {"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()) == path and len(hub.requests) == seen
    listing = easllm(["models"], env | {"HF_HUB_OFFLINE": "1"})
    line = next(line for line in listing.stdout.splitlines() if Q4 in line)
    assert "tiny-gguf" in line and "0.00 GiB" in line and f"huggingface:{GGUF_REPO}" in line


@pytest.mark.slow
def test_several_gguf_files_and_no_quantization_lists_them(env: dict[str, str]) -> None:
    done = easllm(["pull", GGUF_REPO], env)
    assert done.returncode == 2
    assert "several GGUF files" in done.stderr and "Q4_K_M, Q8_0" in done.stderr and Q8 in done.stderr
    missing = easllm(["pull", f"{GGUF_REPO}:Q2_K"], env)
    assert missing.returncode == 2 and "no Q2_K GGUF file" in missing.stderr
    assert "Q4_K_M, Q8_0" in missing.stderr


@pytest.mark.slow
def test_catalog_name_fetches_its_q4_k_m_build_and_quantization_overrides(env: dict[str, str]) -> None:
    fake = FakeHub()
    repo = "Qwen/Qwen1.5-1.8B-Chat-GGUF"
    fake.add(repo, "qwen1_5-1_8b-chat-q4_k_m.gguf", _payload(100_000, 3))
    fake.add(repo, "qwen1_5-1_8b-chat-q8_0.gguf", _payload(150_000, 4))
    with running_hub(fake):
        env = env | {"HF_ENDPOINT": fake.url}
        default = easllm(["pull", "qwen1.5-1.8b"], env)
        assert default.returncode == 0, default.stderr
        assert Path(default.stdout.strip()).name == "qwen1_5-1_8b-chat-q4_k_m.gguf"
        q8 = easllm(["pull", "qwen1.5-1.8b", "--quantization", "q8_0"], env)
        assert Path(q8.stdout.strip()).name == "qwen1_5-1_8b-chat-q8_0.gguf"
        hf = easllm(["pull", "qwen1.5-1.8b", "--engine", "transformers"], env)
    assert hf.returncode == 2 and "Qwen/Qwen1.5-1.8B-Chat: no such repository" in hf.stderr


def test_an_interrupted_transfer_resumes_where_it_stopped(hub: FakeHub, env: dict[str, str]) -> None:
    # huggingface_hub writes in 10 MiB chunks, so a resume starts at a multiple of 10 MiB
    big = "tiny-q6_k.gguf"
    hub.add(GGUF_REPO, big, _payload(12 << 20, 5))
    hub.cut_after[big] = 11 << 20
    done = easllm(["pull", f"{GGUF_REPO}:Q6_K"], env)
    assert done.returncode == 0, done.stderr
    ranges = [r for method, name, r in hub.requests if method == "GET" and name == big]
    assert ranges == [None, f"bytes={10 << 20}-"]  # resumed, not restarted
    assert Path(done.stdout.strip()).read_bytes() == hub.repos[GGUF_REPO][big].content


def test_a_checksum_mismatch_is_refused_and_removed(hub: FakeHub, env: dict[str, str]) -> None:
    hub.repos[GGUF_REPO][Q4].sha256 = "0" * 64  # the hub publishes one SHA-256, serves other bytes
    done = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env)
    assert done.returncode == 2 and "SHA-256" in done.stderr and "removed" in done.stderr
    cache = Path(env["HF_HOME"]) / "hub" / "models--acme--Tiny-GGUF"
    assert not [p for p in cache.rglob("*.gguf") if p.exists()]
    assert not (cache / "blobs" / ("0" * 64)).exists()


def test_two_pulls_at_once_download_once(hub: FakeHub, env: dict[str, str]) -> None:
    hub.seconds_per_chunk = 0.02  # ~0.6 s for the file: the second pull starts while the first runs
    cmd = [sys.executable, "-m", "easllm.cli", "pull", f"{GGUF_REPO}:Q4_K_M"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.3)
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and hub.downloads(Q4) == 1


@pytest.mark.slow
def test_kill_9_mid_transfer_never_leaves_a_loadable_partial(hub: FakeHub, env: dict[str, str]) -> None:
    hub.seconds_per_chunk = 0.05
    cmd = [sys.executable, "-m", "easllm.cli", "pull", f"{GGUF_REPO}:Q4_K_M"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = Path(env["HF_HOME"]) / "hub" / "models--acme--Tiny-GGUF"
    deadline = time.monotonic() + 60
    while not list(cache.glob("blobs/*.incomplete")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("blobs/*.incomplete")), "the kill came after the transfer"
    offline = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env | {"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "easllm pull" in offline.stderr
    hub.seconds_per_chunk = 0.0
    again = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()).read_bytes() == hub.repos[GGUF_REPO][Q4].content


def test_a_gated_repo_without_a_token_says_how_to_pass_one(hub: FakeHub, env: dict[str, str]) -> None:
    hub.gated[GGUF_REPO] = "hf_test_secret"
    refused = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env)
    assert refused.returncode == 2
    assert f"{GGUF_REPO} is gated" in refused.stderr and "HF_TOKEN=" in refused.stderr
    allowed = easllm(["pull", f"{GGUF_REPO}:Q4_K_M"], env | {"HF_TOKEN": "hf_test_secret"})
    assert allowed.returncode == 0, allowed.stderr


def test_offline_and_not_cached_says_what_to_pull_and_where(env: dict[str, str]) -> None:
    done = easllm(["pull", "acme/Absent-GGUF:Q4_K_M"], env | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert "easllm pull acme/Absent-GGUF" in done.stderr and str(Path(env["HF_HOME"]) / "hub") in done.stderr


@pytest.mark.skipif(not GEMMA.is_file(), reason="the bundled gemma GGUF is not assembled")
def test_serve_pulls_a_hub_gguf_when_absent_and_answers(tmp_path: Path) -> None:
    fake = FakeHub()
    fake.add("google-test/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf", GEMMA)
    with running_hub(fake):
        env = {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        args = ["--model-path", "google-test/gemma-3-270m-GGUF", "--threads", "2", "--api-only"]
        with running_server(args, tmp_path, env=env) as server:
            answer = requests.post(
                f"{server.url}/v1/completions",
                json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                headers=server.headers(),
                timeout=60,
            )
            assert answer.status_code == 200 and answer.json()["choices"][0]["text"].strip()
            assert "pulled google-test/gemma-3-270m-GGUF" in server.log()
    assert fake.downloads("gemma-3-270m-Q4_K_M.gguf") == 1


def test_a_safetensors_repository_fetches_what_transformers_loads(env: dict[str, str]) -> None:
    fake = FakeHub()
    repo = "acme/tiny-llama"
    for name, data in [
        ("config.json", b'{"model_type": "llama"}'),
        ("tokenizer.json", b"{}"),
        ("model.safetensors", _payload(50_000, 6)),
        ("pytorch_model.bin", _payload(50_000, 7)),  # the same weights again: not fetched
        ("original/consolidated.pth", _payload(1000, 8)),
    ]:
        fake.add(repo, name, data)
    with running_hub(fake):
        done = easllm(["pull", repo, "--engine", "transformers"], env | {"HF_ENDPOINT": fake.url})
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert fake.downloads("pytorch_model.bin") == 0


@pytest.mark.slow
def test_serve_a_hub_safetensors_repository_on_transformers(tmp_path: Path) -> None:
    from tests.tiny_model import build_tiny_model

    fake = FakeHub()
    fake.add_folder("acme/tiny-llama", build_tiny_model(tmp_path / "tiny-llama"))
    with running_hub(fake):
        env = {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        args = ["--model-path", "acme/tiny-llama", "--engine", "transformers", "--precision", "fp32"]
        args += ["--cpu", "--api-only", "--max-new-tokens", "8"]
        with running_server(args, tmp_path, env=env) as server:
            assert server.health()["engine"]["model"] == "tiny-llama"
            assert requests.post(server.url, data="hello", headers=server.headers(), timeout=60).ok
