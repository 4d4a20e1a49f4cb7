"""History export of a real `easllm serve --engine fake` process: every API, periods, kill -9,
SIGTERM, an unwritable export directory, JSON logs and /metrics, with real clients."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import Server, running_server

NAME = re.compile(r"history-(\d{8}T\d{6}Z)-(\d{8}T\d{6}Z)(-\d+)?\.jsonl")


def serve_args(tmp: Path, interval: float, *extra: str) -> list[str]:
    return [
        "--engine",
        "fake",
        "--max-new-tokens",
        "6",
        "--service-name",
        "ops-test",
        "--data-dir",
        str(tmp / "data"),
        "--export-history-path",
        str(tmp / "export"),
        "--export-interval",
        str(interval),
        *extra,
    ]


def exported(export: Path) -> list[dict[str, Any]]:
    """All records of all export files; each file must be valid JSON Lines named by its period."""
    out = []
    for path in sorted(export.glob("history-*.jsonl")):
        m = NAME.fullmatch(path.name)
        assert m, path.name
        start, end = (datetime.strptime(g, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) for g in m.groups()[:2])
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            at = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            assert start.timestamp() - 1 <= at.timestamp() <= end.timestamp() + 1, (path.name, record["time"])
            out.append(record)
    return out


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def marker() -> str:
    return uuid.uuid4().hex[:8]


def ask_everything(server: Server) -> dict[str, tuple[str, str]]:
    """One round through each API; {prompt: (api, the answer the client got)}."""
    got: dict[str, tuple[str, str]] = {}
    p = f"plain {marker()}"
    r = requests.post(f"{server.url}/", json={"prompt": p}, headers=server.headers(), timeout=30)
    got[p] = ("eas", r.json()["response"])
    p = f"stream {marker()}"
    with requests.post(
        f"{server.url}/",
        json={"prompt": p, "use_stream_chat": True},
        headers=server.headers(),
        stream=True,
        timeout=30,
    ) as r:
        chunks = [json.loads(c) for c in r.content.split(b"\0") if c]
    got[p] = ("eas", chunks[-1]["response"])
    ws = websocket.create_connection(
        server.url.replace("http", "ws") + "/", header=[f"Authorization: {server.token}"], timeout=30
    )
    try:
        for _ in range(2):
            p = f"ws {marker()}"
            ws.send(json.dumps({"prompt": p}))
            last = {}
            while (msg := ws.recv()) != "<EOS>":
                last = json.loads(msg)
            got[p] = ("websocket", last["response"])
    finally:
        ws.close()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=30)
    p = f"chat {marker()}"
    chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": p}])
    got[p] = ("openai.chat", chat.choices[0].message.content or "")
    p = f"chat-stream {marker()}"
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": p}], stream=True
    )
    got[p] = ("openai.chat", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    p = f"completion {marker()}"
    got[p] = ("openai.completions", client.completions.create(model="fake-model", prompt=p).choices[0].text)
    return got


def check_records(records: list[dict[str, Any]], asked: dict[str, tuple[str, str]]) -> None:
    prompts = [r["prompt"] for r in records]
    for prompt, (api, answer) in asked.items():
        assert prompts.count(prompt) == 1, f"{prompt!r} recorded {prompts.count(prompt)} times"
        (record,) = [r for r in records if r["prompt"] == prompt]
        assert record["api"] == api and record["response"] == answer
        assert record["service"] == "ops-test" and record["model"] == "fake-model"
        assert record["client"] == "127.0.0.1" and record["finish_reason"] == "length"
        assert record["usage"]["completion_tokens"] == 6 and record["parameters"]["max_new_tokens"] == 6
        assert record["latency"] >= record["time_to_first_token"] >= 0
        assert (record["session"] is not None) == (api == "websocket")


def test_every_api_is_exported_once_per_period_with_json_logs(tmp_path: Path) -> None:
    with running_server(serve_args(tmp_path, 2, "--log-format", "json"), tmp_path) as server:
        asked = ask_everything(server)
        wait_until(lambda: len(exported(tmp_path / "export")) >= len(asked), what="the period files")
        records = exported(tmp_path / "export")
        check_records(records, asked)
        assert len(records) == len(asked)
        r = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=10)
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }
        assert samples[("easllm_history_exported_records_total", ())] == len(asked)
        assert samples[("easllm_rounds_total", (("api", "websocket"), ("finish_reason", "length")))] == 2
        assert samples[("easllm_generation_tokens_total", (("api", "openai.chat"),))] == 12
        for probe, status in (("/live", "alive"), ("/ready", "ready"), ("/health", "ok")):
            r = requests.get(f"{server.url}{probe}", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == status
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    log = server.log()
    access = [json.loads(line) for line in log.splitlines() if '"logger": "easllm.access"' in line]
    assert {a["route"] for a in access} >= {"/", "/v1/chat/completions", "/v1/completions"}
    assert all(re.fullmatch(r"[0-9a-f]{32}", a["request_id"]) for a in access)
    for prompt in asked:
        assert prompt not in log  # prompts never reach the logs at INFO
    assert server.token is not None and server.token not in log


def test_kill_9_mid_period_loses_nothing_and_sigterm_flushes_the_open_period(tmp_path: Path) -> None:
    export = tmp_path / "export"
    with running_server(serve_args(tmp_path, 3600), tmp_path) as first:
        asked = ask_everything(first)
        assert exported(export) == []  # the hour is not over
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    with running_server(serve_args(tmp_path, 3600), tmp_path) as second:
        wait_until(lambda: len(exported(export)) == len(asked), what="the killed run's rounds")
        check_records(exported(export), asked)
        p = f"after restart {marker()}"
        answer = requests.post(f"{second.url}/", json={"prompt": p}, headers=second.headers(), timeout=30)
        asked[p] = ("eas", answer.json()["response"])
    # SIGTERM: uvicorn shuts down gracefully (then re-raises the signal), exporting the open period
    assert second.process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in second.log()
    records = exported(export)
    check_records(records, asked)
    assert len(records) == len(asked)
    assert list((tmp_path / "data" / "history").iterdir()) == []


def test_an_unwritable_export_directory_never_breaks_serving_and_is_retried(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.write_text("the mount is gone and a file is in its place")
    with running_server(serve_args(tmp_path, 1), tmp_path) as server:
        asked = {}
        for _ in range(3):
            p = f"q {marker()}"
            r = requests.post(f"{server.url}/", json={"prompt": p}, headers=server.headers(), timeout=30)
            assert r.status_code == 200
            asked[p] = ("eas", r.json()["response"])

        def errors() -> float:
            text = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text
            m = re.search(r"^easllm_history_export_errors_total (\S+)$", text, re.M)
            return float(m[1]) if m else 0.0

        wait_until(lambda: errors() > 0, what="a failed export")
        assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200
        assert "cannot write to" in server.log()
        export.unlink()  # the disk is back: the next retry exports the waiting period
        wait_until(lambda: export.is_dir() and len(exported(export)) == 3, what="the retried export")
        check_records(exported(export), asked)
