"""Keeps replicas alive: health checks, restarts with back-off, and the status of each service.

One loop on the console's event loop. A replica that dies is restarted after 1, 2, 4 ... 30 s
(the streak resets after 30 s of health). A start that fails — the process exits before it is
ready (status 2 is `easllm serve`'s "bad configuration", e.g. a model that failed its check), or
/health reports that the model failed to load — is retried the same way; after `max_failed_starts`
failed starts in a row the replica is marked failed with the end of its log, instead of
crash-looping. One failed replica never fails a service whose other replicas are ready: the
service is then `degraded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path

from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry, ReplicaRecord, UnknownService
from easllm.control.routing import ReplicaState, RoutingTable
from easllm.control.runtimes.base import Busy, busy_or_stopped
from easllm.control.runtimes.processes import ProcessLauncher
from easllm.control.spec import ServiceSpec, SpecCache

log = logging.getLogger(__name__)
TICK = 0.25  # seconds between loop turns; starting replicas are checked every turn
DOWN_GRACE = 10.0  # a ready replica whose /health fails this long is restarted
HEALTHY_RESETS_STREAK = 30.0


def log_tail(path: str | Path, lines: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode(errors="replace").rstrip()
    except OSError:
        return ""


class Supervisor:
    def __init__(
        self,
        config: ConsoleConfig,
        registry: Registry,
        launcher: ProcessLauncher,
        routing: RoutingTable,
        specs: SpecCache | None = None,
        busy: Busy | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.launcher = launcher
        self.routing = routing
        self.specs = specs or SpecCache(registry.spec)
        self.busy: Busy = busy if busy is not None else {}  # the controller's; shown as the status
        self.replicas: dict[int, ReplicaState] = {}
        self._next_check: dict[int, float] = {}
        self._streak: dict[int, int] = {}

    def of(self, service: str) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.service == service]

    # starting and stopping one replica -----------------------------------------------------------
    def launch(self, service: str, version: int, spec: ServiceSpec) -> ReplicaState:
        """A new replica of `spec` (recorded, then started); the loop reports when it is ready."""
        self.specs.put(service, version, spec)
        log_dir = self.config.log_dir(service)
        record = self.registry.add_replica(service, version, 0, str(log_dir / "pending.log"))
        log_path = str(log_dir / f"replica-{record.id}.log")
        replica = ReplicaState(record.id, service, version, 0, log_path)
        self._track(replica)
        self._start_process(replica, spec)
        return replica

    def adopt(self, record: ReplicaRecord, service: str) -> ReplicaState:
        """A replica from the database whose process still runs (a console restart): reattach."""
        replica = ReplicaState(
            record.id,
            service,
            record.version,
            record.port,
            record.log_path,
            record.pid,
            record.pid_started,
            "starting",
            record.restarts,
            started_at=time.monotonic(),
        )
        self._track(replica)
        self.registry.add_event(service, "reattach", f"replica {record.id}: pid {record.pid} still runs")
        return replica

    def revive(self, record: ReplicaRecord, service: str) -> ReplicaState:
        """A replica from the database whose process is gone: start it again."""
        replica = ReplicaState(
            record.id, service, record.version, 0, record.log_path, restarts=record.restarts
        )
        self._track(replica)
        self._start_process(replica, self.specs.get(service, record.version))
        why = "stopped with the console" if record.pid is None else f"pid {record.pid} was gone"
        self.registry.add_event(service, "restart", f"replica {record.id}: {why}; started again")
        return replica

    def _track(self, replica: ReplicaState) -> None:
        self.replicas[replica.id] = replica
        self.routing.attach(replica)

    def _start_process(self, replica: ReplicaState, spec: ServiceSpec) -> None:
        launch = self.launcher.start(
            spec,
            Path(replica.log_path),
            self.config.data_dir(replica.service),
            replica_name=f"replica-{replica.id}",
        )
        replica.pid, replica.pid_started, replica.port = launch.pid, launch.pid_started, launch.port
        replica.status, replica.restart_at, replica.ready_since, replica.down_since = (
            "starting",
            None,
            None,
            None,
        )
        replica.started_at = time.monotonic()
        self._next_check[replica.id] = time.monotonic() + TICK
        self.registry.update_replica(
            replica.id,
            pid=launch.pid,
            pid_started=launch.pid_started,
            port=launch.port,
            status="starting",
            restarts=replica.restarts,
            log_path=replica.log_path,
            exit_code=None,
        )

    async def retire(self, replicas: list[ReplicaState]) -> None:
        """Stop these replicas' processes (concurrently) and forget them."""
        for r in replicas:
            r.draining, r.status = True, "stopped"
            self.routing.detach(r)
        await asyncio.gather(*(self.launcher.stop(r.pid, r.pid_started) for r in replicas))
        for r in replicas:
            self.replicas.pop(r.id, None)
            self._next_check.pop(r.id, None)
            self._streak.pop(r.id, None)
            with contextlib.suppress(UnknownService):
                self.registry.remove_replica(r.id)

    def suspect(self, replica: ReplicaState) -> None:
        """The gateway could not reach it: check it on the next turn."""
        self._next_check[replica.id] = 0.0

    async def wait_ready(self, replicas: list[ReplicaState], timeout: float) -> str | None:
        """None once all are ready; else why not (one failed, or `timeout` ran out)."""
        deadline = time.monotonic() + timeout
        while True:
            failed = [r for r in replicas if r.status == "failed"]
            if failed:
                return f"replica {failed[0].id} failed: {failed[0].detail}"
            if all(r.status == "ready" for r in replicas):
                return None
            if time.monotonic() > deadline:
                return f"replicas not ready after {timeout:.0f}s"
            await asyncio.sleep(TICK / 2)

    # the loop ------------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                log.exception("supervisor turn failed")
            await asyncio.sleep(TICK)

    async def check_once(self) -> None:
        now = time.monotonic()
        due = [
            r
            for r in list(self.replicas.values())
            if r.status not in ("failed", "stopped") and self._next_check.get(r.id, 0.0) <= now
        ]
        await asyncio.gather(*(self._check(r) for r in due))
        for service in {r.service for r in due}:
            self.refresh_status(service)

    async def _check(self, r: ReplicaState) -> None:
        now = time.monotonic()
        if r.restart_at is not None:
            if now >= r.restart_at and r.id in self.replicas and not r.draining:
                r.restarts += 1
                self._start_process(r, self.specs.get(r.service, r.version))
            return
        if not self.launcher.alive(r.pid, r.pid_started):
            code = self.launcher.exit_code(r.pid) if r.pid else None
            if r.pid:
                self.launcher.forget(r.pid)
            self._died(r, code, f"exited with status {code}" if code is not None else "process is gone")
            return
        state, detail = await self.launcher.health(r.port)
        self._next_check[r.id] = now + (self.config.health_interval if state == "ready" else TICK)
        if state == "ready":
            r.down_since = None
            if r.status != "ready":
                self._ready(r)
            elif r.ready_since and now - r.ready_since > HEALTHY_RESETS_STREAK:
                self._streak[r.id] = 0
        elif state == "failed":
            await self.launcher.stop(r.pid, r.pid_started, grace=2)
            self._died(r, None, f"the model failed to load: {detail}")
        elif r.status == "ready" or r.status == "unhealthy":
            r.down_since = r.down_since or now
            self._set_status(r, "unhealthy")
            if now - r.down_since > DOWN_GRACE:
                await self.launcher.stop(r.pid, r.pid_started, grace=2)
                self._died(r, None, f"/health failed for {DOWN_GRACE:.0f}s ({detail or state})")
        elif now - r.started_at > self.config.startup_timeout:
            await self.launcher.stop(r.pid, r.pid_started, grace=2)
            self._died(r, None, f"not ready after {self.config.startup_timeout:.0f}s")

    def _ready(self, r: ReplicaState) -> None:
        took = time.monotonic() - r.started_at
        r.ever_ready, r.failed_starts, r.ready_since, r.detail = True, 0, time.monotonic(), ""
        self._set_status(r, "ready")
        self.registry.add_event(
            r.service, "ready", f"replica {r.id} ready on port {r.port} after {took:.1f}s"
        )
        route = self.routing.route(r.service)
        if route is not None:
            route.changed.set()

    def _died(self, r: ReplicaState, code: int | None, why: str) -> None:
        was_ready = r.status in ("ready", "unhealthy")
        r.exit_code = code
        if r.draining or r.id not in self.replicas:
            return
        if not was_ready:
            r.failed_starts += 1
        streak = self._streak.get(r.id, 0) + 1
        self._streak[r.id] = streak
        tail = log_tail(r.log_path)
        if r.failed_starts >= self.config.max_failed_starts:
            r.detail = f"{why}; gave up after {r.failed_starts} failed start(s)\n{tail}"
            self._set_status(r, "failed", exit_code=code)
            self.registry.add_event(r.service, "failed", f"replica {r.id} {r.detail}")
            self.refresh_status(r.service)  # at once: no reader sees a failed replica of a deploying service
            return
        delay = min(2.0 ** (streak - 1), 30.0)
        r.restart_at = time.monotonic() + delay
        r.detail = why
        self._set_status(r, "crashed", exit_code=code)
        self.registry.add_event(r.service, "crash", f"replica {r.id} {why}; restarting in {delay:.0f}s")

    def _set_status(self, r: ReplicaState, status: str, **fields: object) -> None:
        if r.status == status and not fields:
            return
        r.status = status
        with contextlib.suppress(LookupError):
            self.registry.update_replica(r.id, status=status, **fields)

    def refresh_status(self, service: str) -> str:
        """Derive a service's status from its replicas and write it if it changed."""
        try:
            record = self.registry.get(service)
        except UnknownService:
            return "deleted"
        status = busy_or_stopped(record, self.busy)
        if status is None:
            current = [r for r in self.of(service) if r.version == record.current_version and not r.draining]
            ready = sum(r.status == "ready" for r in current)
            wanted = self.specs.get(service, record.current_version).replicas
            if ready >= wanted:
                status = "running"
            elif current and all(r.status == "failed" for r in current):
                status = "failed"
            elif ready:
                status = "degraded"
            else:
                status = "deploying" if record.status in ("deploying", "stopped") else "degraded"
        if status != record.status:
            self.registry.update_service(service, status=status)
        return status
