"""`easllm console` as a subprocess with fake-engine services: the source's flow end to end.

deploy -> endpoint + token -> HTTP, NUL-delimited streaming, SSE and WebSocket through the gateway ->
scale -> update under load -> kill -9 a replica -> stop / start / delete, all with real processes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import requests
import websocket

from tests.servers import free_port

pytestmark = pytest.mark.integration
ADMIN = "admin-token-for-tests"
FAKE = ["--engine", "fake", "--serve-args", "--max-new-tokens 8 --api-only"]
EOS = "<EOS>"


@dataclass
class ConsoleProcess:
    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kwargs)  # type: ignore[arg-type]

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "easllm.cli", *args, "--console", self.url, "--admin-token", ADMIN]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())

    def describe(self, name: str) -> dict:
        r = self.api("GET", f"/api/services/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(self, name: str, check: Callable[[dict], bool], timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            service = self.describe(name)
            if check(service):
                return service
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not get there in {timeout}s: {json.dumps(service, indent=1)}")
            time.sleep(0.2)

    def deploy(self, name: str, *args: str) -> dict:
        """Deploy with the CLI (which waits until ready); returns the described service."""
        out = self.cli("deploy", "--name", name, *args)
        assert out.returncode == 0, out.stdout + out.stderr + self.log()
        return self.describe(name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("EASLLM_TOKEN", "EASLLM_ADMIN_TOKEN", "EASLLM_CONSOLE"):
        env.pop(key, None)
    return env


def replica_pids(state_dir: Path) -> list[int]:
    """PIDs the console recorded (read from its SQLite database, even when the console is gone)."""
    db = state_dir / "console.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as connection:
        return [pid for (pid,) in connection.execute("select pid from replicas where pid is not null")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def kill_leftovers(state_dir: Path) -> None:
    for pid in replica_pids(state_dir):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"easllm" in cmdline:
            os.kill(pid, signal.SIGKILL)


def start_console(
    state_dir: Path, port: int, *extra: str, timeout: float = 90, env: dict[str, str] | None = None
) -> ConsoleProcess:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"console-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "easllm.cli", "console", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--state-dir", str(state_dir), "--admin-token", ADMIN, "--health-interval", "0.5", *extra]
    with log_path.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env() | (env or {}))
    console = ConsoleProcess(f"http://127.0.0.1:{port}", state_dir, process, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"console exited with {process.returncode}:\n{console.log()}")
        try:
            if requests.get(console.url + "/health", timeout=2).status_code == 200:
                return console
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"console not up in {timeout}s:\n{console.log()}")
        time.sleep(0.2)


def stop_console(console: ConsoleProcess, sig: signal.Signals = signal.SIGTERM) -> None:
    if console.process.poll() is None:
        console.process.send_signal(sig)
        try:
            console.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            console.process.kill()
            console.process.wait()


@contextmanager
def running_console(
    state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ConsoleProcess]:
    console = start_console(state_dir, free_port(), *extra, env=env)
    try:
        yield console
    finally:
        stop_console(console)
        kill_leftovers(state_dir)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProcess]:
    # two failed starts (retried once, after 1 s) give a replica up: a broken model fails fast
    with running_console(tmp_path_factory.mktemp("console"), "--max-failed-starts", "2") as running:
        yield running


def call(endpoint: str, token: str, prompt: str, **fields: object) -> requests.Response:
    body = {"prompt": prompt, **fields}
    stream = bool(fields.get("use_stream_chat"))
    return requests.post(endpoint, json=body, headers={"Authorization": token}, timeout=120, stream=stream)


def nul_chunks(response: requests.Response) -> list[dict]:
    return [json.loads(c) for c in response.iter_lines(chunk_size=8192, delimiter=b"\0") if c]


def websocket_round(endpoint: str, token: str, prompt: str) -> str:
    ws = websocket.create_connection(
        endpoint.replace("http", "ws", 1), header=[f"Authorization: {token}"], timeout=60
    )
    try:
        ws.send(json.dumps({"prompt": prompt}))
        messages = []
        while (message := ws.recv()) != EOS:
            messages.append(json.loads(message))
        return messages[-1]["response"]
    finally:
        ws.close()


# ------------------------------------------------------------------------------------------------
def test_deploy_then_call_through_the_gateway(console: ConsoleProcess) -> None:
    out = console.cli("deploy", "--name", "llm_demo001", *FAKE)
    assert out.returncode == 0, out.stderr + console.log()
    assert "ready in" in out.stdout and "Invocation information" in out.stdout
    service = console.describe("llm_demo001")
    endpoint, token = service["invocation"]["endpoint"], service["invocation"]["token"]
    assert endpoint == f"{console.url}/api/predict/llm_demo001" and f"token        {token}" in out.stdout
    assert service["status"] == "running" and service["replicas"] == {"wanted": 1, "ready": 1}

    text = requests.post(endpoint, data=b"hello", headers={"Authorization": token}, timeout=60)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert text.text.startswith("You said: hello.")
    data = call(endpoint, token, "How are you?", history=[["Hi", "Hello!"]]).json()
    assert data["history"] == [["Hi", "Hello!"], ["How are you?", data["response"]]]
    assert data["usage"]["completion_tokens"] == 8 and data["finish_reason"] == "length"
    assert call(endpoint, f"Bearer {token}", "x").status_code == 200

    chunks = nul_chunks(call(endpoint, token, "stream me", use_stream_chat=True))
    texts = [c["response"] for c in chunks]
    assert len(chunks) >= 2 and all(b.startswith(a) for a, b in pairwise(texts))
    assert chunks[-1]["finish_reason"] == "length" and texts[-1].startswith("You said: stream me.")

    assert websocket_round(endpoint, token, "over a socket").startswith("You said: over a socket.")


@pytest.mark.parametrize("header", [None, "wrong-token", "Bearer wrong-token"])
def test_a_wrong_token_is_refused_everywhere(console: ConsoleProcess, header: str | None) -> None:
    endpoint = f"{console.url}/api/predict/llm_demo001"
    headers = {"Authorization": header} if header else {}
    r = requests.post(endpoint, json={"prompt": "x"}, headers=headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{endpoint}/v1/models", headers=headers, timeout=30).status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(endpoint.replace("http", "ws", 1), header=[f"Authorization: {header}"])
    assert info.value.status_code == 401


def test_openai_sse_streams_through_the_gateway(console: ConsoleProcess) -> None:
    service = console.describe("llm_demo001")
    base, token = service["invocation"]["openai_base_url"], service["token"]
    r = requests.post(
        f"{base}/chat/completions",
        json={
            "model": "x",
            "messages": [{"role": "user", "content": "sse"}],
            "stream": True,
            "max_tokens": 5,
        },
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text.startswith("You said: sse.")


def test_streams_pass_through_before_the_answer_ends(console: ConsoleProcess) -> None:
    """The first chunk arrives while the replica is still generating: the gateway does not buffer."""
    console.deploy(
        "long_gen", "--engine", "fake", "--serve-args", "--api-only --max-new-tokens 400000 --ctx-size 500000"
    )
    service = console.describe("long_gen")
    r = call(service["invocation"]["endpoint"], service["token"], "long", use_stream_chat=True,
             stream_format="delta", max_new_tokens=300000)  # fmt: skip
    chunks = r.iter_lines(chunk_size=256, delimiter=b"\0")
    first = json.loads(next(chunks))
    in_flight = console.describe("long_gen")["instances"][0]["outstanding"]
    r.close()
    assert first["response"].startswith("You said: long.") and in_flight == 1
    console.cli("delete", "long_gen")


def test_scaling_to_two_replicas_uses_both(console: ConsoleProcess) -> None:
    before = console.describe("llm_demo001")["instances"]
    out = console.cli("update", "llm_demo001", "--replicas", "2")
    assert out.returncode == 0, out.stderr
    service = console.describe("llm_demo001")
    assert service["replicas"] == {"wanted": 2, "ready": 2} and service["version"] == 2
    assert before[0]["pid"] in [i["pid"] for i in service["instances"]], "scaling keeps the running replica"
    served_before = {i["id"]: i["served"] for i in service["instances"]}
    for n in range(16):  # 16 conversations: prefix routing hashes them over both replicas
        assert call(service["invocation"]["endpoint"], service["token"], f"n{n}").status_code == 200
    served = {
        i["id"]: i["served"] - served_before[i["id"]] for i in console.describe("llm_demo001")["instances"]
    }
    assert sum(served.values()) == 16 and min(served.values()) >= 3, served


class Load:
    """Clients calling a service without pause (HTTP, NUL streams, WebSocket), counting failures."""

    def __init__(self, endpoint: str, token: str, workers: int = 6) -> None:
        self.endpoint, self.token = endpoint, token
        self.ok = 0
        self.failures: list[str] = []
        self.tokens_seen: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, worker: int) -> None:
        session = requests.Session()
        n = 0
        while not self._stop.is_set():
            n += 1
            prompt = f"w{worker}n{n}"
            try:
                if worker % 3 == 2:
                    answer, used = websocket_round(self.endpoint, self.token, prompt), None
                elif worker % 3 == 1:
                    body = {"prompt": prompt, "use_stream_chat": True}
                    headers = {"Authorization": self.token}
                    r = session.post(self.endpoint, json=body, headers=headers, stream=True, timeout=60)
                    r.raise_for_status()
                    last = nul_chunks(r)[-1]
                    answer, used = last["response"], last["usage"]["completion_tokens"]
                else:
                    r = session.post(self.endpoint, json={"prompt": prompt},
                                     headers={"Authorization": self.token}, timeout=60)  # fmt: skip
                    r.raise_for_status()
                    answer, used = r.json()["response"], r.json()["usage"]["completion_tokens"]
                if not answer.startswith(f"You said: {prompt}."):
                    raise AssertionError(f"wrong answer {answer!r}")
                with self._lock:
                    self.ok += 1
                    if used is not None:
                        self.tokens_seen.append(used)
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{prompt}: {exc!r}"[:300])


def test_update_under_load_fails_no_request(console: ConsoleProcess) -> None:
    service = console.deploy("rolling", *FAKE)
    old_pid = service["instances"][0]["pid"]
    with Load(service["invocation"]["endpoint"], service["token"]) as load:
        time.sleep(1.5)
        during = load.ok
        out = console.cli(
            "update", "rolling", "--model", "gemma3-270m", "--serve-args", "--max-new-tokens 4 --api-only"
        )
        assert out.returncode == 0, out.stderr + console.log()
        switched_at = len(load.tokens_seen)
        time.sleep(1.5)
    print(f"\nupdate under load: {load.ok} requests answered, {len(load.failures)} failed")
    assert load.failures == [] and during > 0 and load.ok > during
    assert set(load.tokens_seen[:5]) == {8} and set(load.tokens_seen[switched_at + 20 :]) == {4}
    service = console.describe("rolling")
    assert [(v["version"], v["status"]) for v in service["versions"]] == [(1, "superseded"), (2, "active")]
    assert (
        service["spec"]["model"] == "gemma3-270m"
        and service["versions"][0]["model"] == "qwen2.5-0.5b-instruct"
    )
    assert old_pid not in [i["pid"] for i in service["instances"]] and not alive(old_pid)
    assert [e["kind"] for e in service["events"]].count("switch") == 1


def test_a_killed_replica_is_restarted(console: ConsoleProcess) -> None:
    service = console.describe("rolling")
    [replica] = service["instances"]
    os.kill(replica["pid"], signal.SIGKILL)
    service = console.wait_for(
        "rolling",
        lambda s: s["instances"][0]["pid"] != replica["pid"] and s["instances"][0]["status"] == "ready",
    )
    assert service["instances"][0]["restarts"] == replica["restarts"] + 1
    assert any(e["kind"] == "crash" and "status -9" in e["message"] for e in service["events"])
    assert (
        call(service["invocation"]["endpoint"], service["token"], "back")
        .json()["response"]
        .startswith("You said: back.")
    )


def test_a_replica_dying_mid_request_is_retried_or_reported(console: ConsoleProcess) -> None:
    long_answers = "--api-only --max-new-tokens 400000 --ctx-size 500000"
    service = console.deploy("crashy", "--engine", "fake", "--replicas", "2", "--serve-args", long_answers)
    endpoint, token = service["invocation"]["endpoint"], service["token"]

    def kill_the_busy_replica() -> int:
        busy = console.wait_for("crashy", lambda s: any(i["outstanding"] for i in s["instances"]), timeout=20)
        pid = next(i["pid"] for i in busy["instances"] if i["outstanding"])
        os.kill(pid, signal.SIGKILL)
        return pid

    result: dict[str, requests.Response] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("r", call(endpoint, token, "big", max_new_tokens=200000))
    )
    worker.start()
    killed = kill_the_busy_replica()
    worker.join(timeout=120)
    r = result["r"]
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == 200000, "answered in full by the other replica"
    assert any(e["kind"] == "crash" for e in console.describe("crashy")["events"]) and not alive(killed)

    console.wait_for("crashy", lambda s: s["replicas"]["ready"] == 2)
    stream = call(endpoint, token, "cut", use_stream_chat=True, stream_format="delta", max_new_tokens=300000)
    chunks = stream.iter_lines(chunk_size=256, delimiter=b"\0")
    assert json.loads(next(chunks))["response"].startswith("You said: cut.")
    kill_the_busy_replica()
    rest = [json.loads(c) for c in chunks if c]
    assert "error" in rest[-1] and rest[-1]["error"]["code"] == 502, "a cut stream ends with an error chunk"
    assert "finish_reason" not in rest[-1]
    console.cli("delete", "crashy")


def test_logs_show_and_follow_the_replicas(console: ConsoleProcess) -> None:
    service = console.deploy("logged", *FAKE, "--replicas", "2")
    out = console.cli("logs", "logged", "--tail", "3")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 6, out.stdout
    assert {line.split("]")[0] for line in lines} == {f"[replica-{i['id']}" for i in service["instances"]}
    one = service["instances"][0]["id"]
    only_one = console.cli("logs", "logged", "--replica", str(one)).stdout.splitlines()
    assert only_one and all("[replica-" not in line for line in only_one), "one replica's log: no labels"
    logs = list(console.state_dir.rglob("replica-*.log"))
    assert len(logs) >= 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in logs), logs
    assert all(p.parent.stat().st_mode & 0o777 == 0o700 for p in logs)  # readable by the owner only
    follow = subprocess.Popen(
        [sys.executable, "-m", "easllm.cli", "logs", "logged", "-f", "--tail", "1", "--console", console.url,
         "--admin-token", ADMIN],
        stdout=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        assert select.select([follow.stdout], [], [], 60)[0], "the last lines come first"
        follow.stdout.readline()
        call(service["invocation"]["endpoint"], service["token"], "follow me")
        deadline = time.monotonic() + 20
        seen = b""
        while b"POST" not in seen and (left := deadline - time.monotonic()) > 0:
            if select.select([follow.stdout], [], [], left)[0]:
                seen += follow.stdout.readline()
        assert b"POST" in seen
    finally:
        follow.terminate()
        follow.wait(timeout=10)
    assert console.cli("logs", "nope").returncode == 2
    assert console.cli("logs", "logged", "--replica", "99999").returncode == 2
    console.cli("delete", "logged")


def test_stop_start_and_delete(console: ConsoleProcess, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "llm_spec", "engine": "fake", "token": "spec-token-123",
                                "args": ["--api-only", "--max-new-tokens", "8"]}))  # fmt: skip
    out = console.cli("deploy", str(spec))
    assert out.returncode == 0, out.stderr
    endpoint = f"{console.url}/api/predict/llm_spec"
    pid = console.describe("llm_spec")["instances"][0]["pid"]
    assert call(endpoint, "spec-token-123", "a").status_code == 200

    assert console.cli("stop", "llm_spec").returncode == 0
    assert not alive(pid)
    r = call(endpoint, "spec-token-123", "a")
    assert r.status_code == 503 and "easllm start llm_spec" in r.json()["error"]["message"]
    assert console.describe("llm_spec")["status"] == "stopped"
    assert console.cli("stop", "llm_spec").returncode == 2

    assert console.cli("start", "llm_spec").returncode == 0
    assert call(endpoint, "spec-token-123", "b").json()["response"].startswith("You said: b.")
    pid = console.describe("llm_spec")["instances"][0]["pid"]

    assert console.cli("delete", "llm_spec").returncode == 0
    assert not alive(pid)
    assert call(endpoint, "spec-token-123", "c").status_code == 404
    assert console.cli("describe", "llm_spec").returncode == 2
    assert not (console.state_dir / "logs" / "llm_spec").exists()
    assert "llm_spec" not in console.cli("list").stdout


def test_bad_deploys_are_refused_with_the_reason(console: ConsoleProcess) -> None:
    duplicate = console.cli("deploy", "--name", "llm_demo001", *FAKE)
    assert duplicate.returncode == 2 and "exists already" in duplicate.stderr
    vllm = console.cli("deploy", "--name", "gpu_svc", "--model", "qwen1.5-7b", "--engine", "vllm")
    assert vllm.returncode == 2 and "vLLM needs a CUDA GPU" in vllm.stderr
    huge = console.cli("deploy", "--name", "huge", *FAKE, "--memory", "100000000")
    assert huge.returncode == 2 and "resources.memory" in huge.stderr
    dry = console.cli("deploy", "--name", "big", "--model", "qwen1.5-14b", "--dry-run")
    assert dry.returncode == 0 and "memory per replica" in dry.stdout and "cannot deploy" in dry.stdout
    assert [s["name"] for s in console.api("GET", "/api/services").json()] == ["llm_demo001", "rolling"]


def test_a_model_that_cannot_load_fails_without_a_crash_loop(console: ConsoleProcess, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + b"\0" * 4096)  # a header, no model
    out = console.cli("deploy", "--name", "broken", "--model", str(broken), "--serve-args=--api-only")
    assert out.returncode == 1 and "version 1 failed" in out.stderr, out.stdout + out.stderr
    assert "failed to load" in out.stderr, "deploy prints the reason"
    service = console.describe("broken")
    assert service["status"] == "failed" and service["instances"][0]["status"] == "failed"
    assert service["instances"][0]["restarts"] == 1, "retried once (--max-failed-starts 2), then given up"
    assert "gave up after 2 failed start(s)" in service["instances"][0]["detail"]
    assert any("failed to load" in e["message"] for e in service["events"])
    assert not alive(service["instances"][0]["pid"])
    assert console.cli("delete", "broken").returncode == 0


def test_the_webui_works_through_the_gateway(console: ConsoleProcess) -> None:
    """Two replicas: `?token=` logs the browser in (no second login), and its session stays on one
    replica (the affinity cookie names it) while API calls are not pinned."""
    service = console.deploy("web_svc", "--engine", "fake", "--token", "web-token-123", "--replicas", "2")
    base = f"{service['invocation']['webui']}"
    browser = requests.Session()
    page = browser.get(f"{base}?token=web-token-123", headers={"Accept": "text/html"}, timeout=60)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    pinned = browser.cookies.get("easllm_replica")
    assert pinned is not None and int(pinned) in {r["id"] for r in service["instances"]}
    for _ in range(6):
        config = browser.get(f"{base}config", timeout=30)
        assert config.status_code == 200, "the gateway's ?token= is the WebUI's login"
    assert config.json()["root"] == f"{console.url}/api/predict/web_svc/webui", (
        "the WebUI's links go through the gateway"
    )
    served = {r["id"]: r["served"] for r in console.describe("web_svc")["instances"]}
    assert served[int(pinned)] >= 7 and sum(served.values()) - served[int(pinned)] == 0, served
    api = requests.post(
        service["invocation"]["endpoint"], data=b"hi", headers={"Authorization": "web-token-123"}, timeout=30
    )
    assert api.status_code == 200 and "easllm_replica" not in api.cookies, "API clients are not pinned"
    assert requests.get(base, timeout=30).status_code == 401, "no token, no WebUI"
    console.cli("delete", "web_svc")


def test_the_console_page_lists_services(console: ConsoleProcess) -> None:
    page = requests.get(console.url + "/", timeout=30)
    assert page.status_code == 200 and "View Web App" in page.text
    listed = console.api("GET", "/api/services").json()
    assert {s["name"]: s["status"] for s in listed} == {"llm_demo001": "running", "rolling": "running"}
