"""Two replicas of one service behind the console's gateway share one knowledge base (SQLite in the
service's data directory): an upload through the gateway is answered by both, concurrent uploads
both stay, a replica killed mid-upload leaves the other serving the last commit, and a rolling
update keeps the files. gemma3-270m (the model does not matter here) and the default e5 embedder."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.integration.test_console import ConsoleProcess, alive, running_console

pytestmark = pytest.mark.integration
SERVICE = "kb_svc"
SERVE_ARGS = "--api-only --threads 1 --max-new-tokens 8 --ctx-size 512"
FACT = "The lighthouse keeper's cat is called Pemberton and sleeps in the lamp room."


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProcess]:
    with running_console(tmp_path_factory.mktemp("console_kb")) as running:
        deploy = ["deploy", "--name", SERVICE, "--model", "gemma3-270m", "--replicas", "2"]
        out = running.cli(*deploy, "--serve-args", SERVE_ARGS)
        assert out.returncode == 0, out.stdout + out.stderr + running.log()
        yield running


def headers(service: dict) -> dict[str, str]:
    return {"Authorization": service["token"]}


def replica_urls(service: dict) -> list[str]:
    return [f"http://127.0.0.1:{i['port']}" for i in service["instances"] if i["status"] == "ready"]


def upload(base: str, service: dict, name: str, text: str) -> requests.Response:
    files = [("files", (name, text.encode()))]
    return requests.post(f"{base}/v1/knowledge/files", files=files, headers=headers(service), timeout=120)


def listed(base: str, service: dict) -> list[str]:
    r = requests.get(f"{base}/v1/knowledge/files", headers=headers(service), timeout=60)
    assert r.status_code == 200, r.text
    return [f["name"] for f in r.json()["files"]]


def top_source(base: str, service: dict, query: str) -> str | None:
    body = {"query": query, "top_k": 1}
    r = requests.post(f"{base}/v1/knowledge/query", json=body, headers=headers(service), timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    return results[0]["source"] if results else None


def test_an_upload_through_the_gateway_is_answered_by_both_replicas(console: ConsoleProcess) -> None:
    service = console.describe(SERVICE)
    assert service["replicas"] == {"wanted": 2, "ready": 2}
    endpoint = service["invocation"]["endpoint"]
    assert upload(endpoint, service, "cat.txt", FACT).status_code == 200
    served_before = {i["id"]: i["served"] for i in service["instances"]}
    sources = [top_source(endpoint, service, "What is the cat called?") for _ in range(10)]
    assert sources == ["cat.txt"] * 10
    served = {i["id"]: i["served"] - served_before[i["id"]] for i in console.describe(SERVICE)["instances"]}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served  # both replicas answered
    for base in replica_urls(service):
        assert listed(base, service) == ["cat.txt"] and top_source(base, service, "cat's name") == "cat.txt"


def test_two_concurrent_uploads_through_the_gateway_both_survive(console: ConsoleProcess) -> None:
    service = console.describe(SERVICE)
    endpoint = service["invocation"]["endpoint"]
    texts = {
        "pumps.txt": "The bilge pump is serviced every second Thursday by Ilona.",
        "keys.txt": "The spare keys of the boathouse hang behind the blue door.",
    }
    start = threading.Barrier(len(texts))
    codes: dict[str, int] = {}

    def send(name: str) -> None:
        start.wait()
        codes[name] = upload(endpoint, service, name, texts[name]).status_code

    threads = [threading.Thread(target=send, args=(name,)) for name in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == {"pumps.txt": 200, "keys.txt": 200}
    for base in replica_urls(service):
        assert listed(base, service) == ["cat.txt", "keys.txt", "pumps.txt"]
        assert top_source(base, service, "Who services the bilge pump?") == "pumps.txt"


def test_a_replica_killed_mid_upload_leaves_the_other_serving_the_last_commit(
    console: ConsoleProcess,
) -> None:
    service = console.describe(SERVICE)
    victim, survivor = service["instances"]
    big = "\n\n".join(f"Paragraph {i} describes tide table number {i} in detail." * 4 for i in range(2000))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            upload(f"http://127.0.0.1:{victim['port']}", service, "tides.txt", big)
        except requests.RequestException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)  # the server is parsing, splitting or embedding the ~1,000 chunks by now
    assert sender.is_alive(), "the upload ended before the replica could be killed in the middle of it"
    os.kill(victim["pid"], signal.SIGKILL)  # mid-upload
    sender.join(60)
    assert errors and not alive(victim["pid"])
    base = f"http://127.0.0.1:{survivor['port']}"
    assert listed(base, service) == ["cat.txt", "keys.txt", "pumps.txt"]
    assert top_source(base, service, "Who services the bilge pump?") == "pumps.txt"
    assert top_source(service["invocation"]["endpoint"], service, "cat's name") == "cat.txt"
    back = console.wait_for(
        SERVICE,
        lambda s: s["replicas"]["ready"] == 2 and victim["pid"] not in [i["pid"] for i in s["instances"]],
    )
    for url in replica_urls(back):
        assert listed(url, back) == ["cat.txt", "keys.txt", "pumps.txt"]


def test_a_rolling_update_keeps_the_knowledge_base(console: ConsoleProcess) -> None:
    before = console.describe(SERVICE)
    out = console.cli("update", SERVICE, "--serve-args", SERVE_ARGS + " --temperature 0.5")
    assert out.returncode == 0, out.stdout + out.stderr + console.log()
    service = console.describe(SERVICE)
    assert service["version"] > before["version"] and service["replicas"]["ready"] == 2
    assert not {i["pid"] for i in service["instances"]} & {i["pid"] for i in before["instances"]}
    for base in replica_urls(service):
        assert listed(base, service) == ["cat.txt", "keys.txt", "pumps.txt"]
    assert top_source(service["invocation"]["endpoint"], service, "What is the cat called?") == "cat.txt"
