"""A small Hugging Face Hub for tests: the routes huggingface_hub calls, on a loopback port.

- `GET /api/models/{org}/{repo}[/revision/{rev}]`: model info with `siblings` (size, LFS SHA-256)
- `HEAD|GET /{org}/{repo}/resolve/{rev}/{file}`: X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size
  for LFS files, Content-Length; GET honours `Range` (206) so an interrupted transfer resumes
`FakeModelScope`: the listing and download routes of ModelScope's client.
A gated repository answers 401 with `X-Error-Code: GatedRepo` unless the request carries its token.
Every request is recorded (method, file, Range) so tests can count downloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from tests.servers import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 16


@dataclass
class HubFile:
    content: bytes | Path
    lfs: bool
    sha256: str  # what the hub publishes (tests may make it wrong)

    @property
    def size(self) -> int:
        return self.content.stat().st_size if isinstance(self.content, Path) else len(self.content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else hashlib.sha1(self.sha256.encode()).hexdigest()

    def read(self, start: int) -> Iterator[bytes]:
        if isinstance(self.content, bytes):
            for i in range(start, len(self.content), CHUNK):
                yield self.content[i : i + CHUNK]
            return
        with self.content.open("rb") as f:
            f.seek(start)
            while block := f.read(1 << 20):
                yield block


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)  # repo -> the token that opens it
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, file, Range
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before the 1st GET breaks
    seconds_per_chunk: float = 0.0  # slows downloads so that concurrent pulls overlap
    url: str = ""

    def add(self, repo: str, name: str, content: bytes | Path, lfs: bool | None = None) -> HubFile:
        data = content.read_bytes() if isinstance(content, Path) else content
        is_lfs = lfs if lfs is not None else name.endswith((".gguf", ".safetensors", ".bin"))
        hub_file = HubFile(content, is_lfs, hashlib.sha256(data).hexdigest())
        self.repos.setdefault(repo, {})[name] = hub_file
        return hub_file

    def add_folder(self, repo: str, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                self.add(repo, path.name, path.read_bytes())

    def downloads(self, name: str) -> int:
        return sum(1 for method, file, _ in self.requests if method == "GET" and file == name)

    def app(self) -> FastAPI:
        app = FastAPI()

        def refused(repo: str, request: Request) -> Response | None:
            if repo not in self.repos:
                return Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})
            token = self.gated.get(repo)
            if token and request.headers.get("authorization") != f"Bearer {token}":
                return Response(
                    status_code=401,
                    headers={
                        "X-Error-Code": "GatedRepo",
                        "X-Error-Message": "Access to this model is restricted",
                    },
                )
            return None

        @app.get("/api/models/{org}/{name}")
        @app.get("/api/models/{org}/{name}/revision/{revision}")
        async def model_info(org: str, name: str, request: Request, revision: str = "main") -> Response:
            repo = f"{org}/{name}"
            self.requests.append(("INFO", repo, None))
            if (answer := refused(repo, request)) is not None:
                return answer
            siblings = [
                {"rfilename": n, "size": f.size, "blobId": f.etag}
                | ({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}} if f.lfs else {})
                for n, f in sorted(self.repos[repo].items())
            ]
            return JSONResponse(
                {"_id": repo, "id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                 "gated": "manual" if repo in self.gated else False, "siblings": siblings, "tags": []}
            )  # fmt: skip

        @app.api_route("/{org}/{name}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
        async def resolve(org: str, name: str, revision: str, filename: str, request: Request) -> Response:
            repo = f"{org}/{name}"
            self.requests.append((request.method, filename, request.headers.get("range")))
            if (answer := refused(repo, request)) is not None:
                return answer
            hub_file = self.repos[repo].get(filename)
            if hub_file is None:
                return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub_file.etag}"', "Accept-Ranges": "bytes"}
            if hub_file.lfs:
                headers |= {"X-Linked-Etag": f'"{hub_file.etag}"', "X-Linked-Size": str(hub_file.size)}
            if request.method == "HEAD":
                return Response(headers=headers | {"Content-Length": str(hub_file.size)})
            start = int(request.headers.get("range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{hub_file.size - 1}/{hub_file.size}"
            headers["Content-Length"] = str(hub_file.size - start)
            cut = self.cut_after.pop(filename, None)
            return StreamingResponse(self._body(hub_file, start, cut), status, headers)

        return app

    async def _body(self, hub_file: HubFile, start: int, cut: int | None) -> Iterator[bytes]:  # type: ignore[misc]
        sent = 0
        for block in hub_file.read(start):
            if cut is not None and sent + len(block) > cut:
                yield block[: cut - sent]
                raise ConnectionResetError("fake hub: transfer cut on purpose")
            sent += len(block)
            yield block
            if self.seconds_per_chunk:
                await asyncio.sleep(self.seconds_per_chunk)


@contextmanager
def running_hub(hub: FakeHub | FakeModelScope) -> Iterator[FakeHub | FakeModelScope]:
    """A fake hub (or ModelScope) under uvicorn in a thread on 127.0.0.1; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(hub.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("fake hub did not start")
        time.sleep(0.05)
    hub.url = f"http://127.0.0.1:{port}"
    try:
        yield hub
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class FakeModelScope:
    """The two routes the ModelScope client calls to list and fetch a repository's files."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # route, file
    url: str = ""

    def add(self, repo: str, name: str, content: bytes | Path) -> HubFile:
        data = content.read_bytes() if isinstance(content, Path) else content
        hub_file = HubFile(content, True, hashlib.sha256(data).hexdigest())
        self.repos.setdefault(repo, {})[name] = hub_file
        return hub_file

    def app(self) -> FastAPI:
        app = FastAPI()

        def missing() -> Response:
            return JSONResponse({"Code": 404, "Message": "not found", "Success": False}, status_code=404)

        @app.get("/api/v1/models/{org}/{name}/repo/files")
        async def files(org: str, name: str) -> Response:
            self.requests.append(("files", f"{org}/{name}"))
            repo = self.repos.get(f"{org}/{name}")
            if repo is None:
                return missing()
            listing = [
                {"Path": n, "Name": n, "Size": f.size, "Sha256": f.sha256, "Type": "blob", "Revision": COMMIT}
                for n, f in sorted(repo.items())
            ]
            return JSONResponse({"Code": 200, "Data": {"Files": listing}, "Success": True})

        @app.get("/api/v1/models/{org}/{name}/repo")
        async def download(org: str, name: str, FilePath: str) -> Response:
            self.requests.append(("download", FilePath))
            hub_file = self.repos.get(f"{org}/{name}", {}).get(FilePath)
            if hub_file is None:
                return missing()
            headers = {"Content-Length": str(hub_file.size)}
            return StreamingResponse(hub_file.read(0), 200, headers, "application/octet-stream")

        return app
