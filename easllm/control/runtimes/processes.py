"""The process launcher of local replicas: each one `easllm serve` on a free loopback port, logging
to a file.

Processes start in their own session, so a Ctrl-C meant for the console does not reach them and
they can outlive a console that crashed; the next console finds them by PID and start time
(`/proc/<pid>/stat`), so a reused PID is never mistaken for a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from easllm.control.routing import gateway_prefix
from easllm.control.spec import ServiceSpec
from easllm.private_files import private_dir, private_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    pid: int
    pid_started: str | None
    port: int


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


# The console's own secrets never reach a replica (it could print them, or a spec's code read them).
CONSOLE_SECRETS = frozenset({"EASLLM_ADMIN_TOKEN"})


def replica_env(spec: ServiceSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONSOLE_SECRETS}
    env.update({"EASLLM_TOKEN": spec.token or "", "PYTHONUNBUFFERED": "1"})
    if spec.resources.gpu == 0 and spec.engine != "vllm":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def serve_command(spec: ServiceSpec, port: int, data_dir: Path, replica_name: str | None = None) -> list[str]:
    """The `easllm serve` command line of one replica of `spec` (its token goes in the environment)."""
    options = spec.serve_options()
    cmd = [sys.executable, "-m", "easllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--service-name", spec.name, "--model-path", spec.model]
    if replica_name:
        cmd += ["--replica-name", replica_name]
    cmd += ["--root-path", gateway_prefix(spec.name)]  # links the WebUI makes point at the gateway
    if spec.engine:
        cmd += ["--engine", spec.engine]
    if spec.precision:
        cmd += ["--precision", spec.precision]
    if spec.resources.gpu == 0 and spec.engine != "vllm":
        cmd.append("--cpu")
    if spec.engine == "vllm" and spec.resources.gpu > 1:  # one model over the replica's GPUs
        cmd += ["--tensor-parallel-size", str(spec.resources.gpu)]
    if spec.resources.cpu and options.threads is None:
        cmd += ["--threads", str(spec.resources.cpu)]
    if options.data_dir is None:
        cmd += ["--data-dir", str(data_dir)]
    return cmd + list(spec.args)


class ProcessLauncher:
    """Starts, watches and stops replica processes; knows nothing of services or the database."""

    def __init__(self, health_timeout: float = 3.0) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._http = httpx.AsyncClient(timeout=health_timeout, trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    def start(
        self,
        spec: ServiceSpec,
        log_path: Path,
        data_dir: Path,
        port: int | None = None,
        replica_name: str | None = None,
    ) -> Launch:
        port = port or free_port()
        cmd = serve_command(spec, port, data_dir, replica_name)
        env = replica_env(spec)
        private_dir(log_path.parent)  # a replica's log holds its requests' errors: owner only
        with private_file(log_path).open("ab") as out:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out.write(f"=== {stamp} easllm console: starting replica on port {port}\n".encode())
            out.flush()
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._children[process.pid] = process
        log.info("%s: started replica pid %d on port %d", spec.name, process.pid, port)
        return Launch(process.pid, process_start_time(process.pid), port)

    def alive(self, pid: int | None, pid_started: str | None) -> bool:
        if pid is None:
            return False
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # someone else's process now holds this PID
        started = process_start_time(pid)
        return started is None or pid_started is None or started == pid_started

    def exit_code(self, pid: int) -> int | None:
        """The exit status of a child that ended (negative: killed by that signal); None if unknown."""
        child = self._children.get(pid)
        return child.poll() if child is not None else None

    def forget(self, pid: int) -> None:
        self._children.pop(pid, None)

    async def stop(self, pid: int | None, pid_started: str | None, grace: float = 10.0) -> None:
        """SIGTERM, wait up to `grace` seconds for a clean exit, then SIGKILL."""
        if pid is None or not self.alive(pid, pid_started):
            if pid is not None:
                self._reap(pid)
            return
        self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive(pid, pid_started):
            if time.monotonic() > deadline:
                log.warning("replica pid %d ignored SIGTERM for %.0fs: killing it", pid, grace)
                self._signal(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                grace = 0
            await asyncio.sleep(0.05)
        self._reap(pid)

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _reap(self, pid: int) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                log.warning("replica pid %d did not exit after being stopped", pid)

    async def health(self, port: int) -> tuple[str, str]:
        """(state, detail) of a replica's /health: ready | loading | failed | down."""
        try:
            r = await self._http.get(f"http://127.0.0.1:{port}/health")
        except httpx.HTTPError as exc:
            return "down", type(exc).__name__
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 200:
            return "ready", ""
        if isinstance(body, dict) and body.get("status") == "failed":
            return "failed", str(body.get("error", "the model failed to load"))
        return "loading", ""
