"""Faults on a real `easllm serve --engine fake` process: kill -9 mid-stream and mid-export, then
restart (indexes load, exports complete, nothing half-written); a full disk during ingestion and
export (a small tmpfs: clear errors, serving goes on, nothing lost once space is back).

kill -9 during knowledge-base ingestion is `test_knowledge_server.py`'s; an export directory that
is unwritable is `test_history_server.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import websocket

from tests.integration.test_history_server import check_records, exported, marker, wait_until
from tests.servers import Server, running_server

pytestmark = pytest.mark.integration
TEMP = re.compile(r"\..*\.tmp$")


def serve_args(tmp: Path, *extra: str, data: Path | None = None, export: Path | None = None) -> list[str]:
    return [
        "--engine",
        "fake",
        "--api-only",
        "--max-new-tokens",
        "6",
        "--service-name",
        "ops-test",  # what check_records expects
        "--data-dir",
        str(data or tmp / "data"),
        "--export-history-path",
        str(export or tmp / "export"),
        *extra,
    ]


def leftovers(*roots: Path) -> list[str]:
    """Half-written files: temporaries of atomic writes, anywhere under the roots."""
    return [str(p) for root in roots for p in root.rglob("*") if TEMP.search(p.name)]


def ask(server: Server, prompt: str) -> str:
    r = requests.post(f"{server.url}/", json={"prompt": prompt}, headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["response"]


def upload(server: Server, name: str, text: str) -> requests.Response:
    files = {"files": (name, text.encode())}
    return requests.post(
        f"{server.url}/v1/knowledge/files", files=files, headers=server.headers(), timeout=120
    )


def metric(server: Server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", headers=server.headers(), timeout=10).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


# -- kill -9 mid-stream --------------------------------------------------------------------------


def test_kill_9_mid_streams_then_restart_loses_no_finished_round(tmp_path: Path) -> None:
    long = ["--ctx-size", "400000", "--max-new-tokens", "300000"]  # streams that outlive the kill
    args = serve_args(tmp_path, "--export-interval", "3600", *long)
    asked: dict[str, tuple[str, str]] = {}
    with running_server(args, tmp_path) as first:
        assert upload(first, "vault.txt", "The vault opens with the word marigold.").status_code == 200
        for _ in range(3):
            p = f"done before the kill {marker()} [eos]"
            asked[p] = ("eas", ask(first, p))
        outcomes: dict[str, str] = {}
        started = threading.Barrier(4)

        def stream_eas() -> None:
            body = {"prompt": "a long answer", "use_stream_chat": True}
            with requests.post(
                f"{first.url}/", json=body, headers=first.headers(), stream=True, timeout=30
            ) as r:
                chunks = r.iter_lines(delimiter=b"\0")
                json.loads(next(chunks))
                started.wait()
                for _ in chunks:
                    pass
            outcomes["eas"] = "ended"

        def stream_sse() -> None:
            body = {"messages": [{"role": "user", "content": "long"}], "stream": True}
            url = f"{first.url}/v1/chat/completions"
            with requests.post(url, json=body, headers=first.headers(), stream=True, timeout=30) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith(b"data:"))
                started.wait()
                for _ in lines:
                    pass
            outcomes["sse"] = "ended"

        def stream_ws() -> None:
            url = first.url.replace("http", "ws") + "/"
            ws = websocket.create_connection(url, header=[f"Authorization: {first.token}"], timeout=30)
            ws.send(json.dumps({"prompt": "a long answer"}))
            json.loads(ws.recv())
            started.wait()
            while ws.recv() != "<EOS>":
                pass
            outcomes["ws"] = "ended"

        def guarded(fn: Callable[[], None], key: str) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except (requests.RequestException, websocket.WebSocketException, OSError) as exc:
                    outcomes[key] = type(exc).__name__  # the connection broke: what a client must see

            return run

        threads = [
            threading.Thread(target=guarded(f, k))
            for f, k in ((stream_eas, "eas"), (stream_sse, "sse"), (stream_ws, "ws"))
        ]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # all three are mid-answer
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a client hung on a killed server"
        assert time.monotonic() - killed_at < 30
        assert set(outcomes) == {"eas", "sse", "ws"} and "ended" not in outcomes.values(), outcomes

    with running_server(args, tmp_path) as second:
        listing = requests.get(f"{second.url}/v1/knowledge/files", headers=second.headers(), timeout=10)
        assert [f["name"] for f in listing.json()["files"]] == ["vault.txt"]  # the index loads
        hits = requests.post(
            f"{second.url}/v1/knowledge/query", json={"query": "vault"}, headers=second.headers(), timeout=60
        ).json()["results"]
        assert hits[0]["content"] == "The vault opens with the word marigold."
        p = f"after the restart {marker()} [eos]"
        asked[p] = ("eas", ask(second, p))
    # SIGTERM flushed the open period: the finished rounds of both runs, each exactly once; the
    # three cut-off streams were never answered, and are not rounds.
    records = exported(tmp_path / "export")
    assert sorted(r["prompt"] for r in records) == sorted(asked)
    for r in records:
        assert r["response"] == asked[r["prompt"]][1]
    assert leftovers(tmp_path / "data", tmp_path / "export") == []


# -- kill -9 mid-export --------------------------------------------------------------------------


def test_kill_9_mid_export_then_restart_completes_it_once(tmp_path: Path) -> None:
    """A period big enough that writing its file takes a while; the server is frozen (SIGSTOP) the
    moment the file's temporary appears, checked to be mid-write, then killed."""
    export = tmp_path / "export"
    big = ["--ctx-size", "3000000", "--max-body-mb", "32"]
    args = serve_args(tmp_path, "--export-interval", "10", *big)
    asked: dict[str, tuple[str, str]] = {}
    with running_server(args, tmp_path) as first:
        pad = "x" * 2_500_000  # ~2.5 MB per record: the period's file is tens of MB
        for i in range(16):
            p = f"big {i} {marker()} [eos] {pad}"
            r = requests.post(
                f"{first.url}/",
                json={"prompt": p, "no_template": True},
                headers=first.headers(),
                timeout=60,
            )
            assert r.status_code == 200, r.text[:300]
            asked[p] = ("eas", r.json()["response"])
        caught = freeze_mid_export(first.process, export)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    assert caught, "no export could be caught mid-write"

    with running_server(args, tmp_path) as second:
        wait_until(lambda: len(exported(export)) == len(asked), timeout=120, what="the re-export")
        assert leftovers(export) == []  # the dead export's temporary is gone at once
        records = exported(export)
        assert sorted(r["prompt"] for r in records) == sorted(asked)
        for r in records:
            assert r["response"] == asked[r["prompt"]][1]
        assert requests.get(f"{second.url}/ready", timeout=10).status_code == 200
    assert len(exported(export)) == len(asked)  # and only once, after a clean stop as well
    assert leftovers(export, tmp_path / "data") == []


def freeze_mid_export(process: subprocess.Popen[bytes], export: Path, timeout: float = 120) -> bool:
    """SIGSTOP `process` while it writes an export's temporary file; True if it was caught mid-write
    (the temporary there, its final file not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if any(TEMP.search(name) for name in os.listdir(export)):
                process.send_signal(signal.SIGSTOP)
                names = set(os.listdir(export))
                finals = {n.split(".jsonl")[0].lstrip(".") + ".jsonl" for n in names if TEMP.search(n)}
                if finals and not finals & names:
                    return True
                process.send_signal(signal.SIGCONT)  # too late for that one: wait for the next
        time.sleep(0.002)
    return False


# -- a full disk ---------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_faults_disk.py simulates it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to its last byte; delete the file to free it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for block in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return filler


def test_a_full_disk_refuses_uploads_clearly_keeps_serving_and_loses_no_round(tmp_path: Path) -> None:
    with (
        small_tmpfs(tmp_path / "data", "4m") as data,
        small_tmpfs(tmp_path / "export", "1m") as export,
    ):
        args = serve_args(tmp_path, "--export-interval", "1", data=data, export=export)
        with running_server(args, tmp_path) as server:
            assert upload(server, "before.txt", "Written while there was room.").status_code == 200
            fillers = [fill(data), fill(export)]
            r = upload(server, "manual.txt", "The pump is primed by the red lever. " * 50)
            assert r.status_code == 507, r.text
            error = r.json()["error"]
            assert error["type"] == "insufficient_storage" and error["param"] == "files"
            assert "manual.txt" in error["message"] and "No space left" in error["message"]
            asked = {}
            for _ in range(4):  # serving goes on: rounds are answered, and kept for the export
                p = f"while full {marker()}"  # 6 tokens, finish "length": what check_records expects
                asked[p] = ("eas", ask(server, p))
            wait_until(lambda: metric(server, "easllm_history_export_errors_total") > 0, what="export errors")
            assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200
            files = requests.get(f"{server.url}/v1/knowledge/files", headers=server.headers(), timeout=10)
            assert [f["name"] for f in files.json()["files"]] == ["before.txt"]  # the index is unchanged
            assert leftovers(data, export) == []

            for filler in fillers:  # space is back
                filler.unlink()
            assert upload(server, "manual.txt", "The pump is primed by the red lever.").status_code == 200
            wait_until(lambda: len(exported(export)) == len(asked), timeout=90, what="the retried export")
            check_records(exported(export), asked)
        assert "No space left on device" in server.log()
