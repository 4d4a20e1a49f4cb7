"""`easllm kb add | list | remove | query`: a knowledge base through a running service or its data dir.

With `--url` the commands call the service's /v1/knowledge API (token from --token or
$EASLLM_TOKEN); without it they open the data directory directly (`--data-dir`, default
$EASLLM_HOME/services/<--service-name>) or the database (`--kb-database-url`), embedding in this
process; a running service of that name sees the change at its next question, as its replicas do.
Both print the same lines: the data dir's from the knowledge base's own types (this module sits
below `protocol/`), the service's from its JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from easllm.config import KnowledgeConfig, ServerConfig
from easllm.rag.embedder import DEFAULT_EMBEDDING_MODEL

if TYPE_CHECKING:
    from easllm.rag.store import StoredFile

EXIT_REFUSED = 2


KB_DATABASE_ENV = "EASLLM_KB_DATABASE_URL"


def database_url_arg(text: str) -> str:
    """argparse type of --kb-database-url."""
    from easllm.rag.sql_schema import check_database_url

    try:
        return check_database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_kb_commands(sub: Any) -> None:
    kb = sub.add_parser("kb", help="add, list, remove and search a service's knowledge base")
    target = argparse.ArgumentParser(add_help=False)
    where = target.add_argument_group("which knowledge base")
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000 (else: the data dir)")
    where.add_argument(
        "--token", default=os.environ.get("EASLLM_TOKEN"), help="service token ($EASLLM_TOKEN)"
    )
    where.add_argument("--data-dir", type=Path, default=None, help="service data dir (without --url)")
    where.add_argument(
        "--service-name", default="easllm", help="service whose data dir is used (default easllm)"
    )
    where.add_argument(
        "--kb-database-url",
        type=database_url_arg,
        default=os.environ.get(KB_DATABASE_ENV) or None,
        metavar="URL",
        help=f"the service's knowledge-base database (without --url; default ${KB_DATABASE_ENV}, "
        "else the data dir's)",
    )
    where.add_argument(
        "--embedding-model",
        default=DEFAULT_EMBEDDING_MODEL,
        help="embedder, for the data dir: the one the index was built with (default %(default)s)",
    )
    commands = kb.add_subparsers(dest="kb_command", required=True)
    add = commands.add_parser("add", parents=[target], help="upload files (a same-named file is replaced)")
    add.add_argument("files", nargs="+", type=Path)
    commands.add_parser("list", parents=[target], help="list the indexed files")
    remove = commands.add_parser("remove", parents=[target], help="remove an indexed file")
    remove.add_argument("name")
    query = commands.add_parser("query", parents=[target], help="the chunks nearest to a text")
    query.add_argument("text")
    query.add_argument("--top-k", type=int, default=3)


def run_kb(args: argparse.Namespace) -> int:
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
    target: _Target = _Http(args.url, args.token) if args.url else _Local(args)
    try:
        if args.kb_command == "add":
            return target.add([Path(f) for f in args.files])
        if args.kb_command == "list":
            return target.list()
        if args.kb_command == "remove":
            return target.remove(args.name)
        return target.query(args.text, args.top_k)
    except (_Refused, OSError) as exc:
        print(f"easllm kb: {exc}", file=sys.stderr)
        return EXIT_REFUSED


class _Refused(Exception):
    pass


def _print_file(name: str, kind: str, size: int, chunks: int, pages: int | None, added_at: str) -> None:
    in_pages = f" {pages} pages" if pages else ""
    print(f"{name}\t{kind}\t{size} bytes\t{chunks} chunks{in_pages}\t{added_at}")


def _print_hit(rank: int, score: float, source: str, page: int | None, content: str) -> None:
    where = source + (f", page {page}" if page else "")
    print(f"[{rank}] {score:.3f} {where}\n{content}\n")


def _print_stored(f: StoredFile) -> None:
    added_at = datetime.fromtimestamp(f.added_at, UTC).isoformat(timespec="seconds")
    _print_file(f.name, f.kind, f.size, f.chunks, f.pages, added_at)


def _print_files(files: list[dict[str, Any]]) -> None:
    """The API's `files` items (protocol/knowledge.py's `file_dict`)."""
    for f in files:
        _print_file(f["name"], f["type"], f["size"], f["chunks"], f.get("pages"), f["added_at"])


class _Target(Protocol):
    def add(self, paths: list[Path]) -> int: ...
    def list(self) -> int: ...
    def remove(self, name: str) -> int: ...
    def query(self, text: str, top_k: int) -> int: ...


class _Local:
    def __init__(self, args: argparse.Namespace) -> None:
        from easllm.rag.embedder import SharedEmbedder
        from easllm.rag.knowledge import KnowledgeBase

        config = ServerConfig(service_name=args.service_name, data_dir=args.data_dir)
        self.kb = KnowledgeBase(
            config.service_data_dir / "knowledge",
            SharedEmbedder(args.embedding_model),
            KnowledgeConfig(database_url=args.kb_database_url),
            name=args.service_name,
        )

    def add(self, paths: list[Path]) -> int:
        from easllm.errors import InvalidRequest

        def progress(p: Any) -> None:
            if p.stage in ("embedding", "unchanged"):
                print(f"{p.file}: {p.describe()}", file=sys.stderr)

        failed = 0
        for path in paths:
            try:
                stored = self.kb.add_file(path.name, path.read_bytes(), progress)
            except (InvalidRequest, OSError) as exc:
                print(f"easllm kb: {getattr(exc, 'message', exc)}", file=sys.stderr)
                failed += 1
                continue
            _print_stored(stored)
        return EXIT_REFUSED if failed else 0

    def list(self) -> int:
        for f in self.kb.files():
            _print_stored(f)
        return 0

    def remove(self, name: str) -> int:
        from easllm.rag.knowledge import FileNotInKnowledgeBase

        try:
            self.kb.remove_file(name)
        except FileNotInKnowledgeBase:
            raise _Refused(f"no file named {name!r} in the knowledge base") from None
        print(f"removed {name}")
        return 0

    def query(self, text: str, top_k: int) -> int:
        from easllm.errors import InvalidRequest

        try:
            hits = self.kb.search(text, top_k)
        except InvalidRequest as exc:
            raise _Refused(exc.message) from exc
        for rank, h in enumerate(hits, 1):
            _print_hit(rank, h.score, h.chunk.source, h.chunk.page, h.chunk.content)
        return 0


class _Http:
    def __init__(self, url: str, token: str | None) -> None:
        self.base = url.rstrip("/") + "/v1/knowledge"
        self.token = token

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if self.token:
            request.add_header("Authorization", self.token)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            data = json.loads(exc.read() or b"{}")
            message = data.get("error", {}).get("message", str(exc))
            for f in data.get("files", []):
                _print_files([f])
            raise _Refused(f"{exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise _Refused(f"cannot reach {self.base}: {exc.reason}") from None

    def add(self, paths: list[Path]) -> int:
        boundary = uuid.uuid4().hex
        parts = []
        for path in paths:
            name = path.name.replace('"', "_")
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n")
            parts.append(path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        data = self._call("POST", "/files", b"".join(parts), f"multipart/form-data; boundary={boundary}")
        _print_files(data["files"])
        return 0

    def list(self) -> int:
        _print_files(self._call("GET", "/files")["files"])
        return 0

    def remove(self, name: str) -> int:
        self._call("DELETE", "/files/" + urllib.parse.quote(name, safe=""))
        print(f"removed {name}")
        return 0

    def query(self, text: str, top_k: int) -> int:
        body = json.dumps({"query": text, "top_k": top_k}).encode()
        hits = self._call("POST", "/query", body, "application/json")["results"]
        for rank, h in enumerate(hits, 1):
            _print_hit(rank, h["score"], h["source"], h.get("page"), h["content"])
        return 0
