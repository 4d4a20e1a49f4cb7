"""The supervisor with a scripted process launcher (no processes): a failed start is retried with back-off
like a crash, a replica that keeps failing is given up, and the service with other ready
replicas is degraded, not failed; `easllm deploy`'s wait says why and stops."""

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from easllm.control.config import ConsoleConfig
from easllm.control.progress import wait_for_version
from easllm.control.registry import Registry
from easllm.control.routing import RoutingTable, ServiceRoute
from easllm.control.runtimes.processes import Launch
from easllm.control.runtimes.supervisor import Supervisor
from easllm.control.spec import ServiceSpec, parse_spec


class ScriptedLauncher:
    """Each start takes the next outcome: `ready`, `bad-load` (/health says the model failed to
    load) or `exit` (the process ends with status 2 at once, as `easllm serve` does when the
    model file fails its check). When the script runs out, starts come up ready."""

    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes = outcomes
        self.running: dict[int, str] = {}
        self.starts = 0

    def start(
        self,
        spec: ServiceSpec,
        log_path: Path,
        data_dir: Path,
        port: int | None = None,
        replica_name: str | None = None,
    ) -> Launch:
        self.starts += 1
        pid = 50000 + self.starts
        self.running[pid] = self.outcomes.pop(0) if self.outcomes else "ready"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"start {self.starts} ({replica_name}): {self.running[pid]}\n")
        return Launch(pid, None, pid)  # the port is the pid: health() finds the outcome

    def alive(self, pid: int | None, pid_started: str | None) -> bool:
        return pid in self.running and self.running[pid] != "exit"

    def exit_code(self, pid: int) -> int | None:
        return 2

    def forget(self, pid: int) -> None:
        self.running.pop(pid, None)

    async def stop(self, pid: int | None, pid_started: str | None, grace: float = 10.0) -> None:
        self.running.pop(pid or 0, None)

    async def health(self, port: int) -> tuple[str, str]:
        if self.running.get(port) == "bad-load":
            return "failed", "gemma-3-270m-q4_k_m.gguf: SHA-256 mismatch"
        return "ready", ""

    async def close(self) -> None:
        pass


def supervise(tmp_path: Path, replicas: int, outcomes: list[str], max_failed_starts: int = 5):  # type: ignore[no-untyped-def]
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    spec = parse_spec({"name": "svc", "engine": "fake", "replicas": replicas, "token": "t-123456"})
    record = registry.create_service(spec)
    registry.set_version_status("svc", 1, "active")
    routing = RoutingTable()
    routing.add(ServiceRoute("svc", record.token, 1))
    config = ConsoleConfig(state_dir=tmp_path, max_failed_starts=max_failed_starts)
    launcher = ScriptedLauncher(outcomes)
    supervisor = Supervisor(config, registry, launcher, routing)  # type: ignore[arg-type]
    started = [supervisor.launch("svc", 1, spec) for _ in range(replicas)]
    return supervisor, registry, launcher, started


async def turn_until(supervisor: Supervisor, done: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there"
        await supervisor.check_once()
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("failure", ["bad-load", "exit"])
async def test_a_failed_start_is_retried_and_the_replica_becomes_ready(tmp_path: Path, failure: str) -> None:
    supervisor, registry, launcher, [replica] = supervise(tmp_path, 1, [failure])
    t0 = time.monotonic()
    await turn_until(supervisor, lambda: replica.status == "ready")
    assert time.monotonic() - t0 >= 0.9, "the retry waited its back-off (1 s)"
    assert launcher.starts == 2 and replica.restarts == 1
    events = [(e.kind, e.message) for e in registry.events("svc")]
    assert any(kind == "crash" and "restarting in 1s" in message for kind, message in events), events
    assert registry.get("svc").status == "running"
    registry.close()


async def test_one_replica_that_keeps_failing_does_not_fail_the_service(tmp_path: Path) -> None:
    # replica 1 starts fine, replica 2 fails twice (the limit), replica 3 starts fine
    supervisor, registry, launcher, (a, b, c) = supervise(
        tmp_path, 3, ["ready", "bad-load", "ready", "bad-load"], max_failed_starts=2
    )
    await turn_until(supervisor, lambda: b.status == "failed" and a.status == c.status == "ready")
    assert launcher.starts == 4 and b.restarts == 1
    assert "gave up after 2 failed start(s)" in b.detail and "SHA-256 mismatch" in b.detail
    assert registry.get("svc").status == "degraded"
    route = supervisor.routing.route("svc")
    assert route is not None and {r.id for r in route.serving()} == {a.id, c.id}
    registry.close()


async def test_a_replica_given_up_everywhere_fails_the_service(tmp_path: Path) -> None:
    supervisor, registry, _launcher, [replica] = supervise(tmp_path, 1, ["exit", "exit"], max_failed_starts=2)
    await turn_until(supervisor, lambda: replica.status == "failed")
    assert registry.get("svc").status == "failed"
    registry.close()


async def test_the_service_fails_the_moment_its_last_replica_is_given_up(tmp_path: Path) -> None:
    # `easllm deploy` reads both at once: a failed replica of a still "deploying" service misled it
    supervisor, registry, _launcher, [replica] = supervise(tmp_path, 1, ["exit"], max_failed_starts=1)
    await supervisor._check(replica)  # one replica's check, without the turn's status refresh
    assert replica.status == "failed" and registry.get("svc").status == "failed"
    registry.close()


class DescribingClient:
    """`describe` answers from a script, one dict per call (the last repeats)."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers

    def describe(self, name: str) -> dict[str, Any]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def described(status: str, instances: list[dict[str, Any]], events: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "status": status,
        "versions": [{"version": 1, "status": "active"}],
        "replicas": {"wanted": len(instances), "ready": sum(r["status"] == "ready" for r in instances)},
        "instances": instances,
        "events": [{"at": "", "kind": k, "message": m} for k, m in events],
    }


def test_deploy_stops_waiting_and_says_which_replica_failed(capsys: pytest.CaptureFixture[str]) -> None:
    ready = {"id": 1, "version": 1, "status": "ready"}
    crashed = {"id": 2, "version": 1, "status": "crashed", "detail": "exited with status 2"}
    failed = {"id": 2, "version": 1, "status": "failed", "detail": "exited with status 2; gave up after 2"}
    client = DescribingClient(
        [
            described("deploying", [ready, crashed], [("deploy", "v1")]),
            described(
                "degraded",
                [ready, crashed],
                [("deploy", "v1"), ("crash", "replica 2 exited; restarting in 1s")],
            ),
            described(
                "degraded",
                [ready, failed],
                [("deploy", "v1"), ("crash", "x"), ("failed", "replica 2 gave up")],
            ),
        ]
    )
    assert wait_for_version(client, "svc", 1, timeout=30, started=time.monotonic()) == 1
    err = capsys.readouterr().err
    assert "crash: replica 2 exited; restarting in 1s" in err
    assert (
        "serves with 1 of 2 replicas; 1 failed" in err and "replica 2: exited with status 2; gave up" in err
    )
