"""Services on Ray Serve through the console: a real two-node Ray cluster on this machine.

`ray start --head` plus `ray start --address` (a second node), `easllm console --ray-address`,
a fake-engine service with `"runtime": "ray"`: HTTP, NUL streams, SSE and WebSocket through the
gateway, both replicas answering, scale down and up in place, an update under load without a
failed request, autoscaling from 1 to 2 under load, stop, start and delete of the Serve app.

Some Ray processes listen on every interface, so where user namespaces allow it the module runs
itself again inside `unshare -rn` (a private network with only loopback): nothing it starts can
be reached from outside, and its ports cannot clash with anyone's. Ray is stopped by process
group, never with `ray stop` (which would stop every Ray cluster of this user).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import websocket

from tests.servers import free_port

pytestmark = [pytest.mark.ray, pytest.mark.integration]
RAY = Path(sys.executable).with_name("ray")
ADMIN = "admin-token-for-ray-tests"
INSIDE = "EASLLM_TEST_NETNS"  # set when this module runs inside its private network
LIMIT = 240  # seconds for the whole module, cluster start and teardown included
EOS = "<EOS>"
SERVE_ARGS = "--api-only --max-new-tokens 8"


def _can_isolate() -> bool:
    if os.environ.get(INSIDE) or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


if _can_isolate():

    def test_ray_runtime_in_a_private_network() -> None:
        """This module again, inside `unshare -rn` with loopback up; its result is this test's."""
        script = 'ip link set lo up && exec "$0" -m pytest "$1" -q -s -x -p no:cacheprovider -m ray'
        cmd = ["unshare", "-rn", "sh", "-c", script, sys.executable, __file__]
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            cmd, cwd=root, env={**os.environ, INSIDE: "1"}, capture_output=True, text=True, timeout=LIMIT + 60
        )
        print(out.stdout[-6000:])
        assert out.returncode == 0, out.stdout[-12000:] + out.stderr[-4000:]

else:

    @dataclass
    class Cluster:
        address: str
        temp_dir: Path
        env: dict[str, str]
        groups: list[int] = field(default_factory=list)  # process groups of the `ray start`s
        joining: list[threading.Thread] = field(default_factory=list)  # nodes still starting
        errors: list[BaseException] = field(default_factory=list)

        def start_node(self, *args: str) -> None:
            log = self.temp_dir / f"node-{len(self.groups)}.log"
            common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "3", "--disable-usage-stats"]
            common += ["--memory", str(2 * 2**30), "--object-store-memory", str(100 * 2**20)]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [str(RAY), "start", *args, *common],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # its daemons stay in this process group
                )
            self.groups.append(process.pid)
            if process.wait(timeout=120) != 0:
                raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text()}")

        def add_node_meanwhile(self) -> None:
            """A second node joins while the console starts (both take ~10 s on two busy cores)."""

            def join() -> None:
                started = time.monotonic()
                try:
                    self.start_node("--address", self.address)
                    print(f"\nsecond Ray node joined in {time.monotonic() - started:.1f}s")
                except BaseException as exc:
                    self.errors.append(exc)

            thread = threading.Thread(target=join)
            thread.start()
            self.joining.append(thread)

        def wait_for_nodes(self) -> None:
            for thread in self.joining:
                thread.join(timeout=150)
            assert not self.errors, self.errors

        def stop(self) -> None:
            for thread in self.joining:
                thread.join(timeout=150)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for group in self.groups:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, sig)
                time.sleep(3 if sig == signal.SIGTERM else 0)
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    @pytest.fixture(scope="module")
    def cluster() -> Iterator[Cluster]:
        temp_dir = Path(tempfile.mkdtemp(prefix="eray", dir="/tmp"))  # Ray's socket paths must be short
        token = temp_dir / "auth_token"
        token.write_text(secrets.token_hex(16))
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # the one (head) proxy spreads requests over replicas on every node
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
            # test speed only: replicas report load every second, not every 10 s, so autoscaling is quick
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        }
        gcs_port = free_port()
        ray = Cluster(f"127.0.0.1:{gcs_port}", temp_dir, env)
        started = time.monotonic()
        try:
            ray.start_node(
                "--head", "--port", str(gcs_port), "--include-dashboard=false", "--temp-dir", str(temp_dir)
            )
            print(f"\nRay head up in {time.monotonic() - started:.1f}s")
            ray.add_node_meanwhile()
            yield ray
        finally:
            ray.stop()

    @dataclass
    class Console:
        url: str
        serve_url: str  # Ray Serve's own HTTP proxy
        process: subprocess.Popen[bytes]
        log_path: Path
        env: dict[str, str]
        cluster: Cluster

        def api(self, method: str, path: str, **kwargs: object) -> requests.Response:
            headers = {"Authorization": f"Bearer {ADMIN}"}
            return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]

        def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "easllm.cli", *args, "--console", self.url, "--admin-token", ADMIN]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
            assert out.returncode == 0, out.stdout + out.stderr + self.log()
            return out

        def describe(self, name: str) -> dict:
            r = self.api("GET", f"/api/services/{name}")
            assert r.status_code == 200, r.text
            return r.json()

        def wait_for(self, name: str, check, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + timeout
            while not check(service := self.describe(name)):
                assert time.monotonic() < deadline, json.dumps(service, indent=1) + self.log()
                time.sleep(0.3)
            return service

        def log(self) -> str:
            return self.log_path.read_text(errors="replace")[-5000:]

    @pytest.fixture(scope="module")
    def console(cluster: Cluster) -> Iterator[Console]:
        state = cluster.temp_dir / "console"
        state.mkdir()
        port, serve_port = free_port(), free_port()
        env = {**cluster.env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("EASLLM_TOKEN", "EASLLM_ADMIN_TOKEN", "EASLLM_CONSOLE", "EASLLM_RAY_ADDRESS"):
            env.pop(key, None)
        cmd = [sys.executable, "-m", "easllm.cli", "console", "--port", str(port), "--state-dir", str(state)]
        cmd += ["--admin-token", ADMIN, "--ray-address", cluster.address, "--ray-serve-port", str(serve_port)]
        cmd += ["--drain-timeout", "10", "--startup-timeout", "90"]
        log_path = state / "console.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        running = Console(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{serve_port}", process, log_path, env, cluster
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None and time.monotonic() < deadline, running.log()
                try:
                    if requests.get(running.url + "/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            yield running
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()

    def call(endpoint: str, token: str, prompt: str, **fields: object) -> requests.Response:
        stream = bool(fields.get("use_stream_chat"))
        body = {"prompt": prompt, **fields}
        return requests.post(endpoint, json=body, headers={"Authorization": token}, timeout=60, stream=stream)

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

    def eventually_404(url: str, token: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (
            code := requests.post(url, data=b"x", headers={"Authorization": token}, timeout=30).status_code
        ) != 404:
            assert time.monotonic() < deadline, f"{url} still answers {code}"
            time.sleep(0.2)

    def replica_ids(service: dict) -> set[str]:
        return {r["id"] for r in service["instances"] if r["status"] == "RUNNING"}

    def ready(count: int):  # type: ignore[no-untyped-def]
        def check(s: dict) -> bool:
            return (
                s["status"] == "running" and s["replicas"]["ready"] == count and len(replica_ids(s)) == count
            )

        return check

    # -- the flow, in order ----------------------------------------------------------------------

    def test_deploy_two_replicas_on_ray(console: Console) -> None:
        started = time.monotonic()
        out = console.cli(
            "deploy", "--name", "raysvc", "--runtime", "ray", "--engine", "fake", "--replicas", "2",
            "--serve-args", SERVE_ARGS,
        )  # fmt: skip
        took = time.monotonic() - started
        assert "ready in" in out.stdout
        console.cluster.wait_for_nodes()
        service = console.wait_for("raysvc", ready(2))
        print(f"\ndeploy to ready (2 replicas, fake engine): {took:.1f}s")
        assert service["spec"]["runtime"] == "ray" and service["replicas"] == {"wanted": 2, "ready": 2}
        assert all(r["pid"] and r["runtime"] == "ray" for r in service["instances"])
        # Serve's own proxy serves the app under the gateway's prefix, behind the service token
        direct = f"{console.serve_url}/api/predict/raysvc"
        r = requests.post(direct, data=b"hi", headers={"Authorization": service["token"]}, timeout=30)
        assert r.status_code == 200 and r.text.startswith("You said: hi.")
        assert requests.post(direct, data=b"hi", timeout=30).status_code == 401

    def test_http_streams_and_websocket_through_the_gateway(console: Console) -> None:
        service = console.describe("raysvc")
        endpoint, token = service["invocation"]["endpoint"], service["token"]
        text = requests.post(endpoint, data=b"hello", headers={"Authorization": token}, timeout=30)
        assert text.status_code == 200 and text.text.startswith("You said: hello.")
        assert (
            requests.post(endpoint, data=b"x", headers={"Authorization": "wrong"}, timeout=30).status_code
            == 401
        )

        chunks = [json.loads(c) for c in call(endpoint, token, "stream me", use_stream_chat=True)
                  .iter_lines(delimiter=b"\0") if c]  # fmt: skip
        assert len(chunks) >= 2 and chunks[-1]["finish_reason"] == "length"
        assert chunks[-1]["response"].startswith("You said: stream me.")

        r = requests.post(
            f"{endpoint}/v1/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "sse"}], "stream": True},
            headers={"Authorization": f"Bearer {token}"},
            stream=True,
            timeout=30,
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text.startswith("You said: sse.")

        assert websocket_round(endpoint, token, "over a socket").startswith("You said: over a socket.")

    def test_both_replicas_serve(console: Console) -> None:
        service = console.describe("raysvc")
        endpoint, token = service["invocation"]["endpoint"], service["token"]
        answered = set()
        for n in range(30):  # 30 conversations: Serve spreads new ones over its replicas
            r = requests.post(endpoint, data=f"who {n}", headers={"Authorization": token}, timeout=30)
            assert r.status_code == 200
            answered.add(r.headers["x-easllm-replica"])
        assert answered == replica_ids(service)
        # one conversation stays on one replica: the gateway names it in serve_multiplexed_model_id,
        # easllm's Serve router maps the name onto its hash ring
        same = set()
        for _ in range(10):
            r = requests.post(
                endpoint, data=b"one conversation", headers={"Authorization": token}, timeout=30
            )
            same.add(r.headers["x-easllm-replica"])
        assert len(same) == 1, same

    def test_scale_down_to_one_in_place(console: Console) -> None:
        before = replica_ids(console.describe("raysvc"))
        console.cli("update", "raysvc", "--replicas", "1")
        (kept,) = replica_ids(console.wait_for("raysvc", ready(1)))
        assert kept in before  # Serve scaled: the other replica went, this one was not restarted

    def test_autoscaling_from_one_to_two_under_load_then_fixed_two(console: Console) -> None:
        (kept,) = replica_ids(console.describe("raysvc"))
        scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0}
        r = console.api("PATCH", "/api/services/raysvc", json={"autoscaling": scaling})
        assert r.status_code == 202, r.text
        service = console.wait_for("raysvc", lambda s: s["version"] == 3 and ready(1)(s))
        assert replica_ids(service) == {kept}
        endpoint, token = service["invocation"]["endpoint"], service["token"]
        sockets = [  # an open WebSocket is a request in flight for as long as it lives
            websocket.create_connection(endpoint.replace("http", "ws", 1), header=[f"Authorization: {token}"])
            for _ in range(4)
        ]
        try:
            started = time.monotonic()
            service = console.wait_for("raysvc", lambda s: len(replica_ids(s)) == 2, timeout=90)
            print(f"\nautoscaled 1 -> 2 replicas in {time.monotonic() - started:.1f}s under 4 open sockets")
        finally:
            for ws in sockets:
                ws.close()
        assert kept in replica_ids(service)
        r = console.api("PATCH", "/api/services/raysvc", json={"autoscaling": None, "replicas": 2})
        assert r.status_code == 202, r.text
        service = console.wait_for("raysvc", lambda s: s["version"] == 4 and ready(2)(s))
        assert kept in replica_ids(service)  # back to a fixed 2, still without a restart

    def test_update_rolls_replicas_without_a_failed_request(console: Console) -> None:
        service = console.describe("raysvc")
        endpoint, token = service["invocation"]["endpoint"], service["token"]
        before = replica_ids(service)
        failures: list[str] = []
        lengths: list[int] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    r = call(endpoint, token, "rolling")
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        lengths.append(r.json()["usage"]["completion_tokens"])
                except requests.RequestException as exc:
                    failures.append(repr(exc))

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            console.cli("update", "raysvc", "--serve-args", "--api-only --max-new-tokens 4")
            service = console.wait_for("raysvc", ready(2))
            time.sleep(0.5)
        finally:
            done.set()
            for w in workers:
                w.join()
        assert failures == [] and lengths and lengths[-1] == 4 and 8 in lengths
        assert not replica_ids(service) & before  # a code change restarts every replica
        assert call(endpoint, token, "after").json()["usage"]["completion_tokens"] == 4

    def test_stop_start_and_delete_the_serve_app(console: Console) -> None:
        direct = f"{console.serve_url}/api/predict/raysvc"
        token = console.describe("raysvc")["token"]
        console.cli("stop", "raysvc")
        assert console.describe("raysvc")["status"] == "stopped"
        eventually_404(direct, token)  # Serve's proxy no longer knows the route
        endpoint = console.describe("raysvc")["invocation"]["endpoint"]
        assert (
            requests.post(endpoint, data=b"x", headers={"Authorization": token}, timeout=30).status_code
            == 503
        )
        console.cli("start", "raysvc")
        console.wait_for("raysvc", lambda s: s["status"] == "running" and s["replicas"]["ready"] >= 1)
        assert (
            requests.post(endpoint, data=b"back", headers={"Authorization": token}, timeout=30).status_code
            == 200
        )
        console.cli("delete", "raysvc")
        assert console.api("GET", "/api/services/raysvc").status_code == 404
        eventually_404(direct, token)
        assert (
            requests.post(endpoint, data=b"x", headers={"Authorization": token}, timeout=30).status_code
            == 404
        )
