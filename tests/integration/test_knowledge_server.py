"""The knowledge base in a real `easllm serve` process: killed mid-ingest, restarted, still whole."""

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.rag_samples import DEEPSPEED_README
from tests.servers import running_server

pytestmark = pytest.mark.integration


def test_a_server_killed_mid_ingest_restarts_with_a_whole_index(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--engine", "fake", "--data-dir", str(data), "--kb-chunk-size", "80", "--kb-chunk-overlap", "0"]
    big = "\n\n".join(f"Paragraph {i}: the archive keeps record number {i * 7} safe." for i in range(2000))
    with running_server(args, tmp_path) as server:
        url = f"{server.url}/v1/knowledge/files"
        files = {"files": ("kept.txt", b"The vault opens with the word marigold.")}
        assert requests.post(url, files=files, headers=server.headers(), timeout=60).status_code == 200

        def big_upload() -> None:
            with contextlib.suppress(requests.ConnectionError):  # the server is killed under it
                requests.post(
                    url, files={"files": ("big.txt", big.encode())}, headers=server.headers(), timeout=120
                )

        uploader = threading.Thread(target=big_upload)
        uploader.start()
        deadline = time.monotonic() + 90
        while "big.txt: embedded" not in server.log():  # the upload is half-way through its embeddings
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        server.process.kill()
        server.process.wait()
        uploader.join(timeout=30)

    with running_server(args, tmp_path) as server:
        listing = requests.get(
            f"{server.url}/v1/knowledge/files", headers=server.headers(), timeout=10
        ).json()
        assert [f["name"] for f in listing["files"]] == ["kept.txt"] and listing["chunks"] == 1
        r = requests.post(
            f"{server.url}/v1/knowledge/query",
            json={"query": "vault word"},
            headers=server.headers(),
            timeout=30,
        )
        assert r.json()["results"][0]["content"] == "The vault opens with the word marigold."
    leftovers = [p.name for p in data.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_kb_commands_against_a_running_service(tmp_path: Path) -> None:
    args = ["--engine", "fake", "--data-dir", str(tmp_path / "data")]
    readme = tmp_path / "deepspeed-README.md"
    readme.write_text(DEEPSPEED_README)
    bad = tmp_path / "notes.doc"
    bad.write_bytes(b"\xd0\xcf\x11\xe0")
    with running_server(args, tmp_path) as server:

        def kb(*argv: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "easllm.cli", "kb", *argv, "--url", server.url]
            return subprocess.run(
                [*command, "--token", server.token or ""], capture_output=True, text=True, timeout=120
            )

        added = kb("add", str(readme))
        assert added.returncode == 0 and added.stdout.startswith("deepspeed-README.md\tmd\t"), added
        refused = kb("add", str(bad))
        assert refused.returncode == 2 and "415" in refused.stderr and "notes.doc" in refused.stderr
        found = kb("query", "How do I install deepspeed?", "--top-k", "1")
        assert found.returncode == 0 and "deepspeed-README.md" in found.stdout
        assert "pip install deepspeed" in found.stdout
        assert kb("remove", "deepspeed-README.md").returncode == 0
        listed = kb("list")
        assert listed.returncode == 0 and listed.stdout == ""
        wrong = subprocess.run(
            [sys.executable, "-m", "easllm.cli", "kb", "list", "--url", server.url, "--token", "wrong"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert wrong.returncode == 2 and "401" in wrong.stderr
