"""The console's verbs: deploy, update, stop, start, delete, and bringing services back at start.

Each verb checks its input and the machine first (400 naming the field), then changes the
database, then the processes. An update starts the new version's replicas beside the old ones,
waits until they are ready, switches the gateway to them, drains the old ones and stops them —
so no request fails. A verb on a service that is mid-update is refused (409).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Coroutine
from typing import Any

from easllm.config import easllm_home
from easllm.control.config import ConsoleConfig
from easllm.control.machine import Machine, detect_machine
from easllm.control.pulls import ModelPulls
from easllm.control.ray_services import RayServices
from easllm.control.recommend import Recommendation, recommend
from easllm.control.registry import NameTaken, Registry, ServiceRecord, UnknownService
from easllm.control.routing import ReplicaState, RoutingTable, ServiceRoute
from easllm.control.runtimes.local import LocalRuntime
from easllm.control.spec import ServiceSpec, merge_update
from easllm.control.supervisor import Supervisor
from easllm.control.views import event_json, invocation, replica_json, version_json
from easllm.errors import Conflict, InvalidRequest
from easllm.models.pull import ModelRef

log = logging.getLogger(__name__)


def stopped_message(name: str) -> str:
    return f"service {name} is stopped: start it with `easllm start {name}`"


class Controller:
    def __init__(
        self,
        config: ConsoleConfig,
        registry: Registry,
        runtime: LocalRuntime | None = None,
        routing: RoutingTable | None = None,
        machine: Callable[[], Machine] = detect_machine,
    ) -> None:
        self.config = config
        self.registry = registry
        self.runtime = runtime or LocalRuntime()
        self.routing = routing or RoutingTable(config.routing, config.routing_load_factor)
        self.supervisor = Supervisor(config, registry, self.runtime, self.routing)
        self.ray = RayServices(config, registry, self.routing, self.supervisor.spec, self.supervisor.busy)
        self.machine = machine
        self.pulls = ModelPulls(easllm_home())
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    # life of the console -------------------------------------------------------------------------
    async def open(self) -> None:
        await self.restore()
        self.ray.open()  # `"runtime": "ray"` services: Serve runs their replicas
        self._loop = asyncio.create_task(self.supervisor.run(), name="supervisor")

    async def close(self) -> None:
        for task in [*self._tasks, *([self._loop] if self._loop else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._loop] if self._loop else []), return_exceptions=True)
        await self.ray.close()
        if not self.config.keep_replicas:
            replicas = list(self.supervisor.replicas.values())
            await asyncio.gather(*(self.runtime.stop(r.pid, r.pid_started) for r in replicas))
            for r in replicas:  # the next console starts them again (same rows, new processes)
                self.registry.update_replica(r.id, pid=None, pid_started=None, status="stopped")
        await self.runtime.close()

    async def restore(self) -> None:
        """Bring back what the database says: reattach live replicas, restart dead ones."""
        for record in self.registry.services():
            name = record.name
            running = record.desired == "running"
            self.routing.add(
                ServiceRoute(name, record.token, record.current_version, running, stopped_message(name))
            )
            for version in self.registry.versions(name):
                if version.status == "pending":
                    self.registry.set_version_status(name, version.version, "failed")
                    self.registry.add_event(
                        name, "update", f"version {version.version}: interrupted by a restart"
                    )
            if self.ray.owns(name):
                self.ray.adopt(record)
                continue
            stale = []
            for row in self.registry.replicas(name):
                keep = running and row.version == record.current_version and row.status != "failed"
                if keep and self.runtime.alive(row.pid, row.pid_started):
                    self.supervisor.adopt(row, name)
                elif keep:
                    self.supervisor.revive(row, name)
                else:
                    await self.runtime.stop(row.pid, row.pid_started)
                    stale.append(row.id)
            for replica_id in stale:
                self.registry.remove_replica(replica_id)
            if running:
                spec = self.supervisor.spec(name, record.current_version)
                current = self.supervisor.of(name)
                for _ in range(spec.replicas - len(current)):
                    self.supervisor.launch(name, record.current_version, spec)
                if len(current) > spec.replicas:
                    await self.supervisor.retire(current[spec.replicas :])
            self.supervisor.refresh_status(name)

    # checks --------------------------------------------------------------------------------------
    def check(self, spec: ServiceSpec) -> Recommendation:
        return recommend(spec, self.machine(), easllm_home())  # where the replicas look for models

    def _refuse_unless_fits(self, spec: ServiceSpec) -> Recommendation:
        rec = self.check(spec)
        if rec.problems:
            first = rec.problems[0]
            message = "; ".join(f"{p.param}: {p.message}" for p in rec.problems)
            raise InvalidRequest(f"cannot deploy {spec.name} here: {message}", first.param)
        return rec

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise Conflict(
                f"service {name} is {self.supervisor.busy.get(name, 'busy')}; try again when it is done"
            )
        return lock

    def _spawn(self, work: Coroutine[Any, Any, None], lock: asyncio.Lock) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("background work failed")
            finally:
                lock.release()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # verbs ---------------------------------------------------------------------------------------
    async def deploy(self, spec: ServiceSpec) -> ServiceRecord:
        try:
            self.registry.get(spec.name)
            raise Conflict(f"a service named {spec.name} exists already", "name")
        except UnknownService:
            pass
        if spec.runtime == "ray":
            await self.ray.prepare(spec)
        else:
            await asyncio.to_thread(self._refuse_unless_fits, spec)  # may ask the hub for file sizes
        spec = spec.with_token()
        lock = self._lock(spec.name)
        try:
            record = self.registry.create_service(spec)
        except NameTaken as exc:
            raise Conflict(f"a service named {spec.name} exists already", "name") from exc
        self.registry.set_version_status(spec.name, 1, "active")
        self.routing.add(ServiceRoute(spec.name, record.token, 1))
        if (ref := self.pulls.needed(spec)) is not None:  # fetched once, then the replicas start
            await lock.acquire()
            self._spawn(self._pull_then_launch(spec, ref), lock)
            return record
        async with lock:
            if spec.runtime == "ray":
                await self.ray.deploy(spec, 1)
            for _ in range(spec.replicas if spec.runtime == "local" else 0):
                self.supervisor.launch(spec.name, 1, spec)
        return record

    async def _pull_then_launch(self, spec: ServiceSpec, ref: ModelRef) -> None:
        name = spec.name
        self.supervisor.busy[name] = "pulling"
        self._refresh(name)
        why = await self.pulls.fetch_for(spec, self._pull_event(name), ref)
        self.supervisor.busy.pop(name, None)
        if why is not None:
            self.registry.set_version_status(name, 1, "failed")
            self.registry.update_service(name, status="failed")
            return
        for _ in range(spec.replicas):
            self.supervisor.launch(name, 1, spec)
        self._refresh(name)

    def _pull_event(self, name: str) -> Callable[[str], None]:
        return lambda message: self.registry.add_event(name, "pull", message)

    async def update(self, name: str, changes: dict[str, object]) -> int:
        """Record the next version and roll it out in the background; returns its number."""
        record = self.registry.get(name)
        old = self.supervisor.spec(name, record.current_version)
        new = merge_update(old, changes)
        if new == old:
            raise InvalidRequest("the update changes nothing", next(iter(changes), None))
        scale_only = new.model_copy(update={"replicas": old.replicas}) == old
        if new.runtime != old.runtime:
            raise InvalidRequest("runtime: a service keeps its runtime (deploy a new service)", "runtime")
        if new.runtime == "ray":
            await self.ray.prepare(new)
        elif record.desired == "running" and not (scale_only and new.replicas <= old.replicas):
            extra = new.replicas - old.replicas if scale_only else new.replicas
            await asyncio.to_thread(self._refuse_unless_fits, new.model_copy(update={"replicas": extra}))
        lock = self._lock(name)
        await lock.acquire()
        version = self.registry.add_version(name, new)
        self.supervisor.specs[(name, version)] = new
        self.registry.add_event(name, "update", f"version {version}: {_changes(old, new)}")
        if record.desired != "running":
            self._switch(name, version, record.current_version, new)
            lock.release()
            return version
        self.supervisor.busy[name] = "updating"
        self.registry.update_service(name, status="updating")
        if new.runtime == "ray":
            work = self.ray.roll_out(name, version, record.current_version, new, self._switch)
        else:
            work = (
                self._scale(name, version, new) if scale_only else self._roll_out(name, version, record, new)
            )
        self._spawn(self._finishing(name, work), lock)
        return version

    async def _finishing(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        finally:
            self.supervisor.busy.pop(name, None)
            self._refresh(name)

    def _refresh(self, name: str) -> None:
        if self.ray.owns(name):
            self.ray.refresh(name)
        else:
            self.supervisor.refresh_status(name)

    async def _roll_out(self, name: str, version: int, record: ServiceRecord, spec: ServiceSpec) -> None:
        old = [r for r in self.supervisor.of(name) if r.version != version]
        why = await self.pulls.fetch_for(spec, self._pull_event(name))
        new = [self.supervisor.launch(name, version, spec) for _ in range(spec.replicas)] if not why else []
        why = why or await self.supervisor.wait_ready(new, self.config.startup_timeout)
        if why is not None:
            await self.supervisor.retire(new)
            self.registry.set_version_status(name, version, "failed")
            self.registry.add_event(
                name,
                "update",
                f"version {version} failed, version {record.current_version} keeps serving: {why}",
            )
            return
        self._switch(name, version, record.current_version, spec)
        await self._drain_and_retire(name, old)

    async def _scale(self, name: str, version: int, spec: ServiceSpec) -> None:
        record = self.registry.get(name)
        current = [r for r in self.supervisor.of(name) if not r.draining]
        for r in current:  # the same processes now serve the new version
            r.version = version
            self.registry.update_replica(r.id, version=version)
        self._switch(name, version, record.current_version, spec)
        extra = len(current) - spec.replicas
        if extra > 0:  # not-ready ones go first, then the newest
            order = sorted(current, key=lambda r: (r.status == "ready", r.id))
            await self._drain_and_retire(name, order[:extra])
        else:
            added = [self.supervisor.launch(name, version, spec) for _ in range(-extra)]
            await self.supervisor.wait_ready(added, self.config.startup_timeout)

    def _switch(self, name: str, version: int, previous: int, spec: ServiceSpec) -> None:
        """Make `version` the one the gateway serves (and the one the next start uses)."""
        assert spec.token
        self.registry.update_service(name, current_version=version, token=spec.token)
        self.registry.set_version_status(name, version, "active")
        if previous != version:
            self.registry.set_version_status(name, previous, "superseded")
        route = self.routing.route(name)
        if route is not None:
            route.version, route.token = version, spec.token
        self.registry.add_event(name, "switch", f"now serving version {version}")

    async def _drain_and_retire(self, name: str, replicas: list[ReplicaState]) -> None:
        for r in replicas:
            r.draining = True
        if not await self.routing.drained(replicas, self.config.drain_timeout):
            self.registry.add_event(
                name, "drain", f"requests still running after {self.config.drain_timeout:.0f}s"
            )
        await self.supervisor.retire(replicas)

    async def stop(self, name: str) -> ServiceRecord:
        record = self.registry.get(name)
        if record.desired == "stopped":
            raise Conflict(f"service {name} is stopped already")
        async with self._lock(name):
            await self._stop(name)
        return self.registry.get(name)

    async def _stop(self, name: str) -> None:
        self.supervisor.busy[name] = "stopping"
        try:
            self.registry.update_service(name, desired="stopped", status="stopping")
            route = self.routing.route(name)
            if route is not None:
                route.accepting, route.closed_reason = False, stopped_message(name)
            if self.ray.owns(name):
                await self.ray.stop(name)
            await self._drain_and_retire(name, self.supervisor.of(name))
            self.registry.add_event(name, "stop", "stopped")
        finally:
            self.supervisor.busy.pop(name, None)
            self._refresh(name)

    async def start(self, name: str) -> ServiceRecord:
        record = self.registry.get(name)
        if record.desired == "running" and record.status != "failed":
            raise Conflict(f"service {name} is running already")
        async with self._lock(name):
            await self.supervisor.retire(self.supervisor.of(name))
            spec = self.supervisor.spec(name, record.current_version)
            self.registry.update_service(name, desired="running", status="deploying")
            route = self.routing.route(name)
            if route is not None:
                route.accepting = True
            if spec.runtime == "ray":
                await self.ray.start(name, record.current_version, spec)
            for _ in range(spec.replicas if spec.runtime == "local" else 0):
                self.supervisor.launch(name, record.current_version, spec)
            self.registry.add_event(
                name, "start", f"starting {spec.replicas} replica(s) of version {record.current_version}"
            )
        return self.registry.get(name)

    async def delete(self, name: str) -> None:
        self.registry.get(name)
        async with self._lock(name):
            await self._stop(name)
            self.ray.forget(name)
            self.routing.remove(name)
            self.registry.delete_service(name)
            for key in [k for k in self.supervisor.specs if k[0] == name]:
                del self.supervisor.specs[key]
            for path in (self.config.log_dir(name), self.config.data_dir(name)):
                shutil.rmtree(path, ignore_errors=True)
        self._locks.pop(name, None)

    # reading -------------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        record = self.registry.get(name)
        spec = self.supervisor.spec(name, record.current_version)
        replicas = {r.id: r for r in self.supervisor.of(name)}
        endpoint = self.config.endpoint(name)
        return {
            **self.summary(record),
            "spec": spec.public(),
            "token": record.token,
            "invocation": invocation(endpoint, record.token),
            "instances": self.ray.instances(name, record.current_version)
            if spec.runtime == "ray"
            else [
                replica_json(
                    replicas.get(row.id), row.id, row.version, row.port, row.pid, row.status, row.restarts
                )
                for row in self.registry.replicas(name)
            ],
            "versions": [version_json(v) for v in self.registry.versions(name)],
            "pull": pull.as_dict() if (pull := self.pulls.of(spec)) else None,
            "events": [event_json(e) for e in self.registry.events(name)],
        }

    def summary(self, record: ServiceRecord) -> dict[str, Any]:
        spec = self.supervisor.spec(record.name, record.current_version)
        ready = [
            r for r in self.supervisor.of(record.name) if r.version == record.current_version and r.serving
        ]
        return {
            "name": record.name,
            "status": record.status,
            "desired": record.desired,
            "version": record.current_version,
            "model": spec.model,
            "engine": spec.engine,
            "replicas": {
                "wanted": spec.replicas,
                "ready": self.ray.ready(record.name) if spec.runtime == "ray" else len(ready),
            },
            "endpoint": self.config.endpoint(record.name),
            "webui": f"{self.config.endpoint(record.name)}/webui/",
            "created_at": record.created_at.isoformat(),
            "updated_at": record.updated_at.isoformat(),
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.summary(r) for r in self.registry.services()]


def _changes(old: ServiceSpec, new: ServiceSpec) -> str:
    a, b = old.public(), new.public()
    diff = [f"{k} {a[k]!r} -> {b[k]!r}" for k in b if a.get(k) != b[k]]
    if old.token != new.token:
        diff.append("new token")
    return ", ".join(diff) or "no change"
