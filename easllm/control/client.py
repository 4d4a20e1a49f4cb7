"""A small client of the console's REST API, used by `easllm deploy | list | describe | ...`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from easllm.config import easllm_home
from easllm.control.config import admin_token_file

DEFAULT_CONSOLE = "http://127.0.0.1:8080"


class ConsoleError(RuntimeError):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def default_admin_token(state_dir: Path | None = None) -> str | None:
    """$EASLLM_ADMIN_TOKEN, else the token file a console on this machine wrote."""
    if os.environ.get("EASLLM_ADMIN_TOKEN"):
        return os.environ["EASLLM_ADMIN_TOKEN"]
    path = admin_token_file(state_dir or easllm_home())
    return path.read_text().strip() if path.is_file() else None


class ConsoleClient:
    def __init__(
        self, url: str = DEFAULT_CONSOLE, admin_token: str | None = None, timeout: float = 300
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ConsoleError(
                0, f"cannot reach the console at {self.url}: is `easllm console` running?"
            ) from exc
        if r.status_code >= 400:
            raise _error(r)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.request(method, path, **kwargs)
        return body

    def list(self) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = self.request("GET", "/api/services")
        return services

    def describe(self, name: str) -> dict[str, Any]:
        return self._object("GET", f"/api/services/{name}")

    def deploy(self, spec: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        return self._object(
            "POST", "/api/services", json=spec, params={"dry_run": "true"} if dry_run else None
        )

    def update(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._object("PATCH", f"/api/services/{name}", json=changes)

    def stop(self, name: str) -> dict[str, Any]:
        return self._object("POST", f"/api/services/{name}/stop")

    def start(self, name: str) -> dict[str, Any]:
        return self._object("POST", f"/api/services/{name}/start")

    def delete(self, name: str) -> dict[str, Any]:
        return self._object("DELETE", f"/api/services/{name}")

    def logs(
        self, name: str, tail: int = 100, follow: bool = False, replica: int | None = None
    ) -> Iterator[bytes]:
        params: dict[str, Any] = {"tail": tail, "follow": str(follow).lower()}
        if replica is not None:
            params["replica"] = replica
        try:
            with self._http.stream(
                "GET", f"/api/services/{name}/logs", params=params, timeout=httpx.Timeout(30, read=None)
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _error(r)
                yield from r.iter_raw()
        except httpx.ConnectError as exc:
            raise ConsoleError(0, f"cannot reach the console at {self.url}") from exc


def _error(r: httpx.Response) -> ConsoleError:
    try:
        error = r.json()["error"]
        return ConsoleError(r.status_code, error["message"], error.get("param"))
    except (ValueError, KeyError, TypeError):
        return ConsoleError(r.status_code, r.text or r.reason_phrase)
