"""Start `easllm serve` as a subprocess on a free loopback port, and stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    token: str | None
    process: subprocess.Popen[bytes]
    log_path: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": self.token} if self.token else {}

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    args: list[str], tmp: Path, token: str | None = "test-token", timeout: float = 240
) -> Iterator[Server]:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("EASLLM_TOKEN", None)
    cmd = [sys.executable, "-m", "easllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if token:
        cmd += ["--token", token]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", token, process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {timeout}s:\n{server.log()}")
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
