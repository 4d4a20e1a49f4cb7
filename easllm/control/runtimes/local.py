"""`"runtime": "local"`: a service's replicas are `easllm serve` processes on this machine.

The supervisor (supervisor.py) keeps them alive and the process launcher (processes.py) starts
and stops them; this class maps the controller's verbs onto both. An update starts the new
version's replicas beside the old ones, waits until they are ready, switches the gateway to
them, drains the old ones and stops them, so no request fails; a change of the replica count
alone keeps the processes and only adds or drains some.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from easllm.control.config import ConsoleConfig
from easllm.control.recommend import Recommendation
from easllm.control.registry import Registry, ServiceRecord
from easllm.control.routing import ReplicaState, RoutingTable
from easllm.control.runtimes.base import Busy, Switch
from easllm.control.runtimes.processes import ProcessLauncher
from easllm.control.runtimes.supervisor import Supervisor
from easllm.control.spec import ServiceSpec, SpecCache, scales_only
from easllm.control.views import replica_json
from easllm.errors import InvalidRequest

log = logging.getLogger(__name__)


class LocalRuntime:
    def __init__(
        self,
        config: ConsoleConfig,
        registry: Registry,
        routing: RoutingTable,
        specs: SpecCache,
        busy: Busy,
        check: Callable[[ServiceSpec], Recommendation],
        launcher: ProcessLauncher | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.routing = routing
        self.check = check  # what this machine can run (the controller's `check`)
        self.launcher = launcher or ProcessLauncher()
        self.supervisor = Supervisor(config, registry, self.launcher, routing, specs, busy)
        self._loop: asyncio.Task[None] | None = None

    # life of the console -------------------------------------------------------------------------
    async def adopt(self, record: ServiceRecord) -> None:
        """Reattach replicas whose process still runs, restart dead ones, stop those not wanted."""
        name, supervisor = record.name, self.supervisor
        running = record.desired == "running"
        stale = []
        for row in self.registry.replicas(name):
            keep = running and row.version == record.current_version and row.status != "failed"
            if keep and self.launcher.alive(row.pid, row.pid_started):
                supervisor.adopt(row, name)
            elif keep:
                supervisor.revive(row, name)
            else:
                await self.launcher.stop(row.pid, row.pid_started)
                stale.append(row.id)
        for replica_id in stale:
            self.registry.remove_replica(replica_id)
        if running:
            spec = supervisor.specs.get(name, record.current_version)
            current = supervisor.of(name)
            for _ in range(spec.replicas - len(current)):
                supervisor.launch(name, record.current_version, spec)
            if len(current) > spec.replicas:
                await supervisor.retire(current[spec.replicas :])
        supervisor.refresh_status(name)

    def open(self) -> None:
        self._loop = asyncio.create_task(self.supervisor.run(), name="supervisor")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if not self.config.keep_replicas:
            replicas = list(self.supervisor.replicas.values())
            await asyncio.gather(*(self.launcher.stop(r.pid, r.pid_started) for r in replicas))
            for r in replicas:  # the next console starts them again (same rows, new processes)
                self.registry.update_replica(r.id, pid=None, pid_started=None, status="stopped")
        await self.launcher.close()

    # verbs ---------------------------------------------------------------------------------------
    async def prepare(self, spec: ServiceSpec, old: ServiceSpec | None = None, running: bool = True) -> None:
        """400 unless this machine has room for the replicas `spec` adds (none while stopped)."""
        if not running:
            return
        if old is not None and scales_only(old, spec):
            if spec.replicas <= old.replicas:
                return
            spec = spec.model_copy(update={"replicas": spec.replicas - old.replicas})
        rec = await asyncio.to_thread(self.check, spec)  # may ask the hub for file sizes
        if rec.problems:
            first = rec.problems[0]
            message = "; ".join(f"{p.param}: {p.message}" for p in rec.problems)
            raise InvalidRequest(f"cannot deploy {spec.name} here: {message}", first.param)

    async def deploy(self, spec: ServiceSpec, version: int) -> None:
        for _ in range(spec.replicas):
            self.supervisor.launch(spec.name, version, spec)

    async def roll_out(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        old = [r for r in self.supervisor.of(name) if r.version != version]
        new = [self.supervisor.launch(name, version, spec) for _ in range(spec.replicas)]
        why = await self.supervisor.wait_ready(new, self.config.startup_timeout)
        if why is not None:
            await self.supervisor.retire(new)
            return why
        switch()
        await self._drain_and_retire(name, old)
        return None

    async def scale(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        current = [r for r in self.supervisor.of(name) if not r.draining]
        for r in current:  # the same processes now serve the new version
            r.version = version
            self.registry.update_replica(r.id, version=version)
        switch()
        extra = len(current) - spec.replicas
        if extra > 0:  # not-ready ones go first, then the newest
            order = sorted(current, key=lambda r: (r.status == "ready", r.id))
            await self._drain_and_retire(name, order[:extra])
        else:
            added = [self.supervisor.launch(name, version, spec) for _ in range(-extra)]
            await self.supervisor.wait_ready(added, self.config.startup_timeout)
        return None  # the version serves already; a replica that fails to start says so itself

    async def _drain_and_retire(self, name: str, replicas: list[ReplicaState]) -> None:
        for r in replicas:
            r.draining = True
        if not await self.routing.drained(replicas, self.config.drain_timeout):
            self.registry.add_event(
                name, "drain", f"requests still running after {self.config.drain_timeout:.0f}s"
            )
        await self.supervisor.retire(replicas)

    async def stop(self, name: str) -> None:
        await self._drain_and_retire(name, self.supervisor.of(name))

    async def start(self, name: str, version: int, spec: ServiceSpec) -> None:
        await self.supervisor.retire(self.supervisor.of(name))  # failed ones, if any
        await self.deploy(spec, version)

    def forget(self, name: str) -> None:
        """Nothing is left: `stop` retired every replica (their rows go with the service)."""

    # reading -------------------------------------------------------------------------------------
    def refresh_status(self, name: str) -> str:
        return self.supervisor.refresh_status(name)

    def ready(self, name: str, version: int) -> int:
        return sum(r.version == version and r.serving for r in self.supervisor.of(name))

    def instances(self, name: str, version: int) -> list[dict[str, Any]]:
        live = {r.id: r for r in self.supervisor.of(name)}
        return [
            replica_json(live.get(row.id), row.id, row.version, row.port, row.pid, row.status, row.restarts)
            for row in self.registry.replicas(name)
        ]

    def suspect(self, replica: ReplicaState) -> None:
        self.supervisor.suspect(replica)
