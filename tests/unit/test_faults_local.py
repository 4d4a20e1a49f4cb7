"""Faults without a real process or a real full disk (the integration tests have those):
a database at its size limit during ingestion, an engine closed with requests waiting, an
export's temporary file left by a killed process, PDFs that loop or repeat a costly page."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from easllm.app import create_app
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import GenerationRequest, SamplingParams
from easllm.errors import InvalidRequest, NotReady, TooLarge
from easllm.export.exporter import HistoryExporter, period_name
from easllm.rag import loaders
from easllm.rag.loaders import load_document
from easllm.rag.sql_schema import open_engine
from easllm.server.state import state_of
from tests.rag_samples import pdf_bytes

TOKEN = "fault-token"
AUTH = {"Authorization": TOKEN}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = ServerConfig(token=TOKEN, api_only=True, data_dir=tmp_path, sampling=SamplingDefaults(8))
    with TestClient(create_app(config, FakeEngine(context_length=512))) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield c


def upload(client: TestClient, name: str, text: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/knowledge/files", files=[("files", (name, text.encode()))], headers=AUTH)


def fill_the_database(client: TestClient) -> Callable[[], None]:
    """SQLite's own limit on the file's pages, so the next write that grows it fails SQLITE_FULL."""
    engine = state_of(client.app).knowledge.store.engine
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def limit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    event.listen(engine, "connect", limit)
    engine.dispose()

    def undo() -> None:
        event.remove(engine, "connect", limit)
        engine.dispose()

    return undo


# -- disk full (simulated) -------------------------------------------------------------------------


def test_a_full_database_during_ingestion_is_a_507_naming_the_file_and_changes_nothing(
    client: TestClient, tmp_path: Path
) -> None:
    assert upload(client, "kept.txt", "The vault opens with the word marigold.").status_code == 200
    undo = fill_the_database(client)
    pumps = "Fresh words about pumps." + " " * 30_000  # one chunk, but its original needs new pages
    files = [("files", ("new.txt", pumps.encode())), ("files", ("x.exe", b"MZ"))]
    r = client.post("/v1/knowledge/files", files=files, headers=AUTH)
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["error"]["type"] == "insufficient_storage" and body["error"]["param"] == "files"
    assert [(e["name"], e["code"]) for e in body["errors"]] == [("new.txt", 507), ("x.exe", 415)]
    assert "new.txt" in body["errors"][0]["message"] and "No space left" in body["errors"][0]["message"]
    assert client.post("/", content=b"still serving [eos]", headers=AUTH).status_code == 200
    listed = client.get("/v1/knowledge/files", headers=AUTH).json()
    assert [f["name"] for f in listed["files"]] == ["kept.txt"] and listed["chunks"] == 1
    knowledge = state_of(client.app).knowledge
    assert knowledge.original("kept.txt").startswith(b"The vault")  # and the refused file left nothing:
    assert knowledge.store.original("new.txt") is None
    undo()
    assert upload(client, "new.txt", pumps).status_code == 200  # space is back


def test_a_knowledge_base_database_out_of_reach_is_a_503_on_every_route_not_a_500(
    client: TestClient,
) -> None:
    assert upload(client, "kept.txt", "The vault opens with the word marigold.").status_code == 200
    store = state_of(client.app).knowledge.store
    reachable = store.engine
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    store.engine = open_engine(f"postgresql+psycopg://kb@127.0.0.1:{closed}/kb")
    try:
        replies = [
            client.get("/v1/knowledge/files", headers=AUTH),
            client.post("/v1/knowledge/query", json={"query": "vault"}, headers=AUTH),
            upload(client, "new.txt", "Fresh words about pumps."),
            client.delete("/v1/knowledge/files/kept.txt", headers=AUTH),
            client.post("/", json={"prompt": "vault word?", "langchain": True}, headers=AUTH),
        ]
        assert [r.status_code for r in replies] == [503] * 5, [r.text for r in replies]
        assert all("database cannot be used now" in r.text for r in replies)
        assert client.post("/", content=b"still serving [eos]", headers=AUTH).status_code == 200
    finally:
        store.engine = reachable
    assert [f["name"] for f in client.get("/v1/knowledge/files", headers=AUTH).json()["files"]] == [
        "kept.txt"
    ]


# -- an engine closed with requests waiting ---------------------------------------------------------


async def test_requests_waiting_when_the_engine_closes_get_503_not_a_hang() -> None:
    engine = FakeEngine(token_delay=0.01)
    await engine.start()

    async def ask(prompt: str) -> str:
        req = GenerationRequest(engine.tokenize(prompt), SamplingParams(max_new_tokens=100_000))
        async for _ in engine.generate(req):
            pass
        return "finished"

    tasks = [asyncio.create_task(ask(f"q{i}")) for i in range(3)]  # one running, two queued
    await asyncio.sleep(0.2)
    await engine.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
    assert all(isinstance(r, NotReady) and "shutting down" in str(r) for r in results), results
    await engine.start()  # a closed engine starts again (an app's lifespan may run twice)
    assert await asyncio.wait_for(ask("again [eos]"), timeout=10) == "finished"
    await engine.close()


async def test_clients_leaving_after_the_last_token_leave_nothing_behind() -> None:
    """Found by bench/soak.py: the id of a request aborted after it finished stayed in the engine's
    set of cancelled ids for ever (one per such client, in a long-running server)."""
    engine = FakeEngine(keep_requests=10)
    await engine.start()
    for i in range(40):
        req = GenerationRequest(engine.tokenize(f"q{i}"), SamplingParams(max_new_tokens=3))
        stream = engine.generate(req)
        await anext(stream)
        await asyncio.sleep(0.01)  # the worker finishes the request meanwhile
        await stream.aclose()  # the client leaves before reading the end: an abort
    deadline = time.monotonic() + 5
    while engine.health().running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine._cancelled == set() and engine._live == set()
    assert len(engine.requests) <= 20  # a served fake engine keeps only its last requests
    await engine.close()


# -- an export killed mid-write ------------------------------------------------------------------------


def test_a_dead_exports_temporary_is_removed_at_the_next_start(tmp_path: Path) -> None:
    export, wal = tmp_path / "export", tmp_path / "wal"
    export.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    from easllm.export import exporter as export_module

    host = export_module._HOST
    name = period_name(time.time() - 7200, time.time() - 3600)
    mine_dead = export / f".{name}.{host}.{dead_pid}.tmp"
    alive = export / f".{name}.{host}.{os.getppid()}.tmp"  # a live process: maybe mid-export
    elsewhere = export / f".{name}.otherhost.{dead_pid}.tmp"  # another host's: only by age
    for temp in (mine_dead, alive, elsewhere):
        temp.write_bytes(b'{"half": ')
    h = HistoryExporter(export, wal, 60)
    h.start()
    assert h.close()
    assert not mine_dead.exists() and alive.exists() and elsewhere.exists()


# -- PDFs that loop or cost too much -----------------------------------------------------------------


def cyclic_pages_pdf() -> bytes:
    good = pdf_bytes([["hello"]])
    return good.replace(b"/Kids [3 0 R]", b"/Kids [2 0 R]")  # the page tree holds itself


def test_pdfs_that_loop_are_refused_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRequest) as refused:
        load_document("loop.pdf", cyclic_pages_pdf())
    assert refused.value.status == 400 and "cyclic" in refused.value.message
    assert time.monotonic() - started < 10


def test_a_pdf_repeating_one_page_past_the_limits_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    page = pdf_bytes([["one costly page"]])
    many = page.replace(b"/Kids [3 0 R] /Count 1", b"/Kids [" + b"3 0 R " * 50 + b"] /Count 50")
    monkeypatch.setattr(loaders, "MAX_PDF_PAGES", 40)
    with pytest.raises(TooLarge, match="50 pages; the limit is 40"):
        load_document("many.pdf", many)
    monkeypatch.setattr(loaders, "MAX_PDF_PAGES", 10_000)
    monkeypatch.setattr(loaders, "PDF_SECONDS", 0.0)  # every page is over the time budget
    with pytest.raises(TooLarge, match=r"took over 0 s \(stopped at page 1 of 50\)"):
        load_document("many.pdf", many)
    monkeypatch.setattr(loaders, "PDF_SECONDS", 120.0)
    assert load_document("many.pdf", many).pages == 50


# -- a client gone mid-body ------------------------------------------------------------------------------


async def test_a_client_gone_while_sending_its_body_is_not_a_server_error(tmp_path: Path) -> None:
    """Found by bench/soak.py: this was an unhandled ClientDisconnect, a traceback and a 500."""
    app = create_app(ServerConfig(api_only=True, data_dir=tmp_path), FakeEngine())
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", b"100"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    incoming = [{"type": "http.request", "body": b'{"prompt": "pa', "more_body": True}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)  # an unhandled exception would propagate here
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
