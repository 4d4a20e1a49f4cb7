"""Start `easllm serve` as a subprocess on a free loopback port, and stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
        wait_ready(process, f"{server.url}/health", timeout, server.log)
        yield server
    finally:
        stop(process, signal.SIGTERM)


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout: float, log: Callable[[], str]) -> None:
    """Poll `url` until it answers 200; RuntimeError when the process exits, TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{log()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready in {timeout}s:\n{log()}")
        time.sleep(0.25)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Stop a process we started, by PID: `sig`, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
