"""`easllm console` settings: flags map one to one onto ConsoleConfig."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from easllm.control.registry import default_url

ADMIN_TOKEN_FILE = "console-admin-token"


@dataclass(frozen=True)
class ConsoleConfig:
    state_dir: Path  # console.db, the admin token file, logs/<service>/, services/<service>/ (data)
    host: str = "127.0.0.1"
    port: int = 8080
    db_url: str | None = None  # default: SQLite at state_dir/console.db
    admin_token: str = ""
    public_url: str | None = None  # how clients reach the gateway; default http://host:port
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback-bound console answers (its public URL's too)
    keep_replicas: bool = False  # leave replicas running when the console exits (reattach later)
    health_interval: float = 2.0  # seconds between health checks of a ready replica
    startup_timeout: float = 600.0  # a replica not ready by then is restarted
    drain_timeout: float = 120.0  # longest wait for in-flight requests before stopping a replica
    max_failed_starts: int = 5  # starts in a row that die before ready: the replica is marked failed
    routing: str = (
        "prefix"  # prefix: a conversation's requests go to one replica (bounded load); least-loaded
    )
    routing_load_factor: float = 1.25  # prefix routing: no replica above this x the average load
    log_level: str = "INFO"
    ray_address: str | None = None  # the Ray cluster for `"runtime": "ray"` services; `local`: a private one
    ray_serve_port: int = 8000  # where Ray Serve's HTTP proxy listens (loopback of the head node)

    @property
    def database_url(self) -> str:
        return self.db_url or default_url(self.state_dir)

    @property
    def gateway_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def endpoint(self, service: str) -> str:
        return f"{self.gateway_url}/api/predict/{service}"

    def log_dir(self, service: str) -> Path:
        return self.state_dir / "logs" / service

    def data_dir(self, service: str) -> Path:
        return self.state_dir / "services" / service


def admin_token_file(state_dir: Path) -> Path:
    return state_dir / ADMIN_TOKEN_FILE


def load_or_create_admin_token(state_dir: Path) -> str:
    """The admin token kept in state_dir (mode 0600), created on first use."""
    path = admin_token_file(state_dir)
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
