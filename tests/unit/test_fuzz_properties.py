"""Hypothesis property tests of the hostile-input edges: EAS request parsing, WebSocket message
handling and knowledge-base uploads. Every input either works or is refused with a 4xx naming
the problem; nothing else escapes, and the server still answers afterwards."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from easllm.app import create_app
from easllm.config import KnowledgeConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.errors import InvalidRequest
from easllm.protocol.eas import EasRequest, parse_eas_body
from easllm.rag.loaders import safe_file_name
from easllm.server.routes.websocket import EOS

TOKEN = "prop-token"
AUTH = {"Authorization": TOKEN}
CAP = 8  # the server's --max-new-tokens
# Bounded for `make test`: no example database, no shrinking (a failure prints its example as found).
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
SOCKETS = settings(FAST, max_examples=30)
UPLOADS = settings(FAST, max_examples=12)  # each one parses and embeds: the slowest

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "input_ids",
    "system_prompt",
    "history",
    "max_new_tokens",
    "max_new_tokens ",
    "use_stream_chat",
    "temperature",
    "top_k",
    "top_p",
    "do_sample",
    "stop",
    "stop_sequences",
    "repetition_penalty",
    "seed",
    "langchain",
    "no_template",
    "stream_format",
]
# What a hostile client sends (issue 16): nesting deeper than Python's parser goes, numbers beyond
# 64 bits either way, long lists in list fields, huge keys.
deep_json = st.integers(1, 60_000).map(lambda depth: "[" * depth + "]" * depth)
huge_numbers = st.integers(-(2**70), 2**70) | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**40, -1])
long_lists = st.integers(0, 3000).flatmap(
    lambda n: st.sampled_from([[["q", "a"]] * n, ["s"] * n, [0] * n, ["x" * 300] * min(n, 40)])
)
large_keys = st.text(min_size=1, max_size=5).map(lambda t: t * 4000)
hostile_values = huge_numbers | long_lists | st.floats(allow_nan=True, allow_infinity=True)
# Objects with the protocol's own keys (and sensible values half of the time), so parsing gets past
# the first field; plus the occasional unknown key.
eas_objects = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8) | large_keys,
    json_values
    | hostile_values
    | st.sampled_from(["hi", "True", "False", "delta", "cumulative", 0, 1, 3, -1, 0.5, 2.5, 10**12])
    | st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
    max_size=6,
)


def with_deep_field(fields: tuple[str, str]) -> bytes:
    field, deep = fields
    return ('{"prompt": "hi", "%s": %s}' % (field, deep)).encode()  # noqa: UP031


bodies = (
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | eas_objects.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.tuples(st.sampled_from(FIELDS), deep_json).map(with_deep_field)
)
content_types = st.sampled_from(
    [None, "application/json", "text/plain", "application/json; charset=utf-8", "x/y"]
)


def start(engine: FakeEngine, data_dir: Path, **extra: Any) -> TestClient:
    config = ServerConfig(
        token=TOKEN, api_only=True, data_dir=data_dir, sampling=SamplingDefaults(max_new_tokens=CAP), **extra
    )
    return TestClient(create_app(config, engine))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(context_length=256)


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    with start(engine, tmp_path, knowledge=KnowledgeConfig(max_file_mb=0.05)) as c:
        deadline = time.monotonic() + 5
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield c


def is_error(body: Any, status: int | None = None) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and bool(error["message"])
        and (status is None or error.get("code") == status)
    )


# -- EAS parsing ---------------------------------------------------------------------------------


@FAST
@given(body=bodies, content_type=content_types)
def test_eas_parsing_returns_a_request_or_a_400_naming_the_field(
    body: bytes, content_type: str | None
) -> None:
    try:
        parsed = parse_eas_body(body, content_type)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message and exc.param  # names the field, or "body"/"prompt"
        return
    if isinstance(parsed, str):
        assert parsed.encode() == body  # a non-object body is the prompt, byte for byte
        return
    assert isinstance(parsed, EasRequest)
    sampling = parsed.sampling(SamplingDefaults(max_new_tokens=CAP))
    assert 1 <= sampling.max_new_tokens <= CAP  # capped at the server's limit whatever was asked
    assert 0 <= sampling.temperature <= 2 and 0 < sampling.top_p <= 1
    assert all(isinstance(q, str) and isinstance(a, str) for q, a in parsed.conversation().history)


@FAST
@given(body=bodies, content_type=content_types, stream=st.booleans())
def test_any_eas_body_over_http_is_answered_or_refused_with_a_json_4xx(
    client: TestClient, engine: FakeEngine, body: bytes, content_type: str | None, stream: bool
) -> None:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = client.post("/", content=body, headers=headers)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert is_error(r.json(), 400) and r.json()["error"]["param"]
    elif r.headers["content-type"].startswith("application/json"):
        assert r.json()["usage"]["completion_tokens"] <= CAP
    assert engine.health().running == 0


# -- WebSocket messages ---------------------------------------------------------------------------

ws_messages = st.lists(
    eas_objects.map(json.dumps)
    | st.text(max_size=60)
    | st.binary(max_size=60)
    | st.just("{")
    | st.just(json.dumps({"prompt": "hello", "use_stream_chat": False})),
    min_size=1,
    max_size=5,
)


@SOCKETS
@given(messages=ws_messages)
def test_every_websocket_message_gets_json_then_eos_and_the_connection_stays(
    client: TestClient, engine: FakeEngine, messages: list[str | bytes]
) -> None:
    with client.websocket_connect("/", headers=AUTH) as ws:
        for message in messages:  # several in a row, as clients may: answered in order
            if isinstance(message, bytes):
                ws.send_bytes(message)
            else:
                ws.send_text(message)
        for _ in messages:
            replies = []
            while (text := ws.receive_text()) != EOS:
                replies.append(json.loads(text))
            assert replies, "each message gets at least one JSON message before <EOS>"
            last = replies[-1]
            assert is_error(last) or ("response" in last and "history" in last), last
            if is_error(last):
                assert 400 <= last["error"]["code"] < 500, last
        ws.send_text(json.dumps({"prompt": "still there? [eos]", "history": []}))  # the connection lives
        replies = []
        while (text := ws.receive_text()) != EOS:
            replies.append(json.loads(text))
        assert replies[-1]["response"] == "You said: still there? [eos]."
    deadline = time.monotonic() + 5
    while engine.health().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.health().running == 0


# -- knowledge-base uploads ----------------------------------------------------------------------

names = st.tuples(
    st.sampled_from(["", "../", "..\\..\\", "/etc/", "a/b/", ".", "\x00", "CON", "~/"]),
    st.text(max_size=40),
    st.sampled_from([".txt", ".md", ".pdf", ".docx", ".exe", "", ".TXT", ".txt.", ".md\x00.txt"]),
).map("".join)
contents = (
    st.text(min_size=1, max_size=400).map(str.encode)
    | st.binary(max_size=400)
    | st.sampled_from([b"%PDF-1.4 broken", b"PK\x03\x04 broken zip", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"])
)


@UPLOADS
@given(files=st.lists(st.tuples(names, contents), min_size=1, max_size=3))
def test_any_upload_is_indexed_under_a_safe_name_or_refused_with_a_json_4xx(
    client: TestClient, tmp_path: Path, files: list[tuple[str, bytes]]
) -> None:
    r = client.post("/v1/knowledge/files", files=[("files", f) for f in files], headers=AUTH)
    body = r.json()
    assert r.status_code in (200, 400, 413, 415), body
    added = body["files"]
    if r.status_code != 200:
        assert is_error(body, r.status_code) and body["error"]["param"] == "files"
        assert len(body["errors"]) + len(added) <= len(files)
    for f in added:
        name = f["name"]
        assert name and "/" not in name and "\\" not in name and not name.startswith(".")
        assert not any(unicodedata.category(ch)[0] == "C" for ch in name)
        assert safe_file_name(name) == name  # already as safe as the sanitizer makes any name
    root = (tmp_path / "knowledge").resolve()
    for path in tmp_path.rglob("*"):  # nothing was written outside the knowledge base's folder
        assert path.resolve().is_relative_to(root), path
    listed = client.get("/v1/knowledge/files", headers=AUTH)
    assert listed.status_code == 200


# -- OpenAI bodies, odd methods and headers (issue 16) ---------------------------------------------

CHAT_FIELDS = ["messages", "stop", "seed", "n", "max_tokens", "temperature", "top_p", "logit_bias", "tools"]
chat_objects = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "hi"}])},
    optional={name: hostile_values | json_values for name in CHAT_FIELDS[1:]},
).map(json.dumps)
chat_bodies = (
    chat_objects.map(str.encode)
    | st.tuples(st.sampled_from(CHAT_FIELDS), deep_json).map(
        lambda f: ('{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % f).encode()  # noqa: UP031
    )
    | st.dictionaries(large_keys, st.integers(), min_size=1, max_size=3).map(
        lambda d: json.dumps({"messages": [{"role": "user", "content": "hi"}], **d}).encode()
    )
)


@FAST
@given(body=chat_bodies)
def test_any_chat_completion_body_is_answered_or_a_400(client: TestClient, body: bytes) -> None:
    r = client.post(
        "/v1/chat/completions", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert is_error(r.json(), 400)


odd_methods = st.sampled_from(
    ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "BREW", "X" * 40]
)
odd_paths = st.sampled_from(
    ["/", "/v1/models", "/v1/chat/completions", "/v1/knowledge/files", "/metrics", "/nope"]
)
header_values = st.sampled_from(["", "x" * 8000, "null", "http://evil.example", "localhost", "\t", "0"])
odd_headers = st.dictionaries(
    st.sampled_from(
        ["Host", "Origin", "Content-Type", "Content-Length", "X-Request-Id", "Authorization", "Cookie"]
    ),
    header_values,
    max_size=4,
)


@FAST
@given(method=odd_methods, path=odd_paths, headers=odd_headers)
def test_odd_methods_and_headers_never_get_a_5xx(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    if "Content-Length" in headers and not headers["Content-Length"].isdigit():
        headers.pop("Content-Length")  # the HTTP client itself refuses to send those
    headers.setdefault("Authorization", TOKEN)
    r = client.request(method, path, headers=headers, content=b"{}")
    assert r.status_code < 500, (method, path, headers, r.text[:300])
    if r.status_code >= 400 and method != "HEAD":
        assert is_error(r.json())
    assert 'method="X' not in client.get("/metrics", headers=AUTH).text  # one "other" label for them
