"""Hostile input, round 2 (issue 16): bodies before a login and slow bodies, DOCX tables that
break python-docx, a PDF page that costs too much, chat-template loops without calls."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jinja2.exceptions import SecurityError

from easllm.app import create_app
from easllm.chat import sandbox
from easllm.chat.sandbox import BoundedSandbox, render_bounded
from easllm.config import LimitsConfig, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.errors import InvalidRequest, TooLarge
from easllm.rag import loaders
from easllm.rag.loaders import load_document
from easllm.server.limits import LOGIN_BODY_LIMIT, RequestLimits
from tests.rag_samples import docx_bytes, pdf_bytes

TOKEN = "limits-token"

# -- bodies before the WebUI login, and slow bodies -------------------------------------------------------


def test_webui_bodies_before_a_login_are_small(tmp_path: Path) -> None:
    app = create_app(ServerConfig(token=TOKEN, data_dir=tmp_path), FakeEngine())
    with TestClient(app) as client:
        for path in ("/webui/login", "/webui/gradio_api/upload", "/webui/gradio_api/queue/join"):
            r = client.post(path, content=b"u" * (LOGIN_BODY_LIMIT + 1))
            assert r.status_code == 413, (path, r.status_code)
            assert "before logging in to the WebUI" in r.json()["error"]["message"]


def test_a_webui_session_or_an_open_service_keeps_the_upload_limit(tmp_path: Path) -> None:
    def limit(config: ServerConfig, path: str, cookie: bytes | None) -> int:
        limits = RequestLimits(lambda *_: None, config)  # type: ignore[arg-type, return-value]
        headers = [(b"cookie", cookie)] if cookie else []
        return limits._limit_for({"method": "POST", "path": path, "headers": headers}, path)[0]

    closed, open_ = ServerConfig(token=TOKEN), ServerConfig()
    session = b"access-token-abc=xyz"
    assert limit(closed, "/webui/gradio_api/upload", session) > 16 * 1024 * 1024
    assert limit(closed, "/webui/login", session) == LOGIN_BODY_LIMIT  # the login itself stays small
    assert limit(open_, "/webui/gradio_api/upload", None) > 16 * 1024 * 1024


def asgi_scope(path: str = "/") -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def test_a_body_that_trickles_in_is_cut_off_with_408(tmp_path: Path) -> None:
    limits = LimitsConfig(body_timeout=0.3)
    app = create_app(ServerConfig(api_only=True, data_dir=tmp_path, limits=limits), FakeEngine())
    pieces = iter([b'{"prompt": "a', b"b"])

    async def receive() -> dict[str, object]:
        piece = next(pieces, None)
        if piece is None:
            await asyncio.sleep(3600)  # a client that never sends the rest
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": piece, "more_body": True}

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    started = time.monotonic()
    await asyncio.wait_for(app(asgi_scope(), receive, send), timeout=10)
    assert time.monotonic() - started < 3
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b"did not arrive within 0.3 s" in sent[1]["body"]  # type: ignore[operator]


async def test_a_streamed_answer_is_not_cut_by_the_body_timeout(tmp_path: Path) -> None:
    """Once the body is in, waiting for a disconnect (streaming responses do) has no time limit."""
    limits = LimitsConfig(body_timeout=0.2)
    engine = FakeEngine(token_delay=0.1)
    app = create_app(ServerConfig(api_only=True, data_dir=tmp_path, limits=limits), engine)
    with TestClient(app) as client:
        body = {"prompt": "count", "use_stream_chat": True, "max_new_tokens": 6}
        r = client.post("/", json=body)
        assert r.status_code == 200 and r.content.count(b"\0") >= 5


# -- DOCX tables and PDF pages ----------------------------------------------------------------------------


def patched_docx(change: bytes) -> bytes:
    """A DOCX with a two-row table whose first cell carries `change` in its properties."""
    data = docx_bytes("Title", ["A paragraph"], table=[["a", "b"], ["c", "d"]])
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in source.infolist():
            content = source.read(entry)
            if entry.filename == "word/document.xml":
                content = content.replace(b"<w:tcPr>", b"<w:tcPr>" + change, 1)
            archive.writestr(entry, content)
    return out.getvalue()


@pytest.mark.parametrize("change", [b'<w:gridSpan w:val="x"/>', b"<w:vMerge/>"])
def test_a_malformed_docx_table_is_a_400_naming_the_file(change: bytes) -> None:
    with pytest.raises(InvalidRequest) as refused:
        load_document("report.docx", patched_docx(change))
    assert refused.value.status == 400 and "report.docx is a corrupt DOCX file" in refused.value.message


def test_a_malformed_table_fails_its_file_only_in_an_upload(tmp_path: Path) -> None:
    app = create_app(ServerConfig(api_only=True, data_dir=tmp_path), FakeEngine())
    files = [
        ("files", ("bad.docx", patched_docx(b"<w:vMerge/>"), "application/octet-stream")),
        ("files", ("good.txt", b"some good text about llamas", "text/plain")),
    ]
    with TestClient(app) as client:
        r = client.post("/v1/knowledge/files", files=files)
    assert r.status_code == 400, r.text
    body = r.json()
    assert [f["name"] for f in body["files"]] == ["good.txt"]  # the rest of the upload is indexed
    assert [(f["name"], f["code"]) for f in body["errors"]] == [("bad.docx", 400)]


def test_docx_reading_has_a_time_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = itertools.count(0.0, 1.0)  # every look at the clock is a second later
    monkeypatch.setattr(loaders.time, "monotonic", lambda: next(ticks))
    monkeypatch.setattr(loaders, "DOCX_SECONDS", 2.5)
    with pytest.raises(TooLarge, match=r"took over 2\.5 s"):
        load_document("slow.docx", docx_bytes("T", ["p"] * 10, table=[["a", "b"]] * 10))


def test_the_pdf_deadline_holds_inside_one_page(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"line {i}" for i in range(200)]  # one page, hundreds of text operators
    ticks = itertools.count(0.0, 1.0)
    monkeypatch.setattr(loaders.time, "monotonic", lambda: next(ticks))
    monkeypatch.setattr(loaders, "PDF_SECONDS", 5.0)
    with pytest.raises(TooLarge, match=r"took over 5 s \(stopped at page 1 of 1\)"):
        load_document("one.pdf", pdf_bytes([lines]))


# -- chat templates ---------------------------------------------------------------------------------------


def test_a_template_looping_without_calls_stops_at_the_time_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.3)
    loops = "{% for a in m %}{% for b in m %}{% for c in m %}{% endfor %}{% endfor %}{% endfor %}done"
    template = BoundedSandbox().from_string(loops)
    started = time.monotonic()
    with pytest.raises(SecurityError, match=r"ran for more than 0\.3 s"):
        render_bounded(template.generate(m=list(range(2000))))  # 8e9 steps
    assert time.monotonic() - started < 3


def test_timed_loops_keep_their_meaning() -> None:
    source = "{% for x in m if x %}{{ loop.index }}/{{ loop.length }}{% else %}none{% endfor %}"
    template = BoundedSandbox().from_string(source)
    assert render_bounded(template.generate(m=[0, 1, 2])) == "1/22/2"
    assert render_bounded(template.generate(m=[])) == "none"
    assert re.fullmatch(
        r"a-b", render_bounded(BoundedSandbox().from_string("{{ m|join('-') }}").generate(m="ab"))
    )
