"""The console's verbs: deploy, update, stop, start, delete, and bringing services back at start.

Each verb checks its input and the machine first (400 naming the field), then changes the
database, then the replicas, through the service's runtime (runtimes/base.py: local processes or
Ray Serve; the controller never asks which). An update runs in the background: the runtime
starts the new version beside the old one and calls back to switch the gateway once it serves,
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
from easllm.control.recommend import Recommendation, recommend
from easllm.control.registry import NameTaken, Registry, ServiceRecord, UnknownService
from easllm.control.routing import ReplicaState, RoutingTable, ServiceRoute
from easllm.control.runtimes.base import ServiceRuntime
from easllm.control.runtimes.local import LocalRuntime
from easllm.control.runtimes.ray import RayRuntime
from easllm.control.spec import ServiceSpec, SpecCache, merge_update, scales_only
from easllm.control.views import changes_between, event_json, invocation, service_summary, version_json
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
        runtimes: dict[str, ServiceRuntime] | None = None,
        routing: RoutingTable | None = None,
        machine: Callable[[], Machine] = detect_machine,
    ) -> None:
        self.config = config
        self.registry = registry
        self.routing = routing or RoutingTable(config.routing, config.routing_load_factor)
        self.machine = machine
        self.specs = SpecCache(registry.spec)
        self.busy: dict[str, str] = {}  # service -> "pulling" | "updating" | "stopping": its status
        self.runtimes: dict[str, ServiceRuntime] = runtimes or {  # by the spec's `runtime`
            "local": LocalRuntime(config, registry, self.routing, self.specs, self.busy, self.check),
            "ray": RayRuntime(config, registry, self.routing, self.specs, self.busy),
        }
        self.pulls = ModelPulls(easllm_home())
        self._runtime_of: dict[str, ServiceRuntime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def runtime_of(self, name: str) -> ServiceRuntime:
        """The runtime that runs `name`'s replicas (a service keeps its runtime for life)."""
        runtime = self._runtime_of.get(name)
        if runtime is None:
            spec = self.specs.get(name, self.registry.get(name).current_version)
            runtime = self._runtime_of[name] = self.runtimes[spec.runtime]
        return runtime

    # life of the console -------------------------------------------------------------------------
    async def open(self) -> None:
        await self.restore()
        for runtime in self.runtimes.values():
            runtime.open()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runtime in self.runtimes.values():
            await runtime.close()

    async def restore(self) -> None:
        """Bring back what the database says: each runtime takes back its services."""
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
            await self.runtime_of(name).adopt(record)

    # checks --------------------------------------------------------------------------------------
    def check(self, spec: ServiceSpec) -> Recommendation:
        return recommend(spec, self.machine(), easllm_home())  # where the replicas look for models

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise Conflict(f"service {name} is {self.busy.get(name, 'busy')}; try again when it is done")
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

    def _refresh(self, name: str) -> None:
        self.runtime_of(name).refresh_status(name)

    def suspect(self, replica: ReplicaState) -> None:
        """The gateway could not reach `replica`: its runtime looks at it soon."""
        runtime = self._runtime_of.get(replica.service)
        if runtime is not None:
            runtime.suspect(replica)

    # verbs ---------------------------------------------------------------------------------------
    async def deploy(self, spec: ServiceSpec) -> ServiceRecord:
        try:
            self.registry.get(spec.name)
            raise Conflict(f"a service named {spec.name} exists already", "name")
        except UnknownService:
            pass
        runtime = self.runtimes[spec.runtime]
        await runtime.prepare(spec)
        spec = spec.with_token()
        lock = self._lock(spec.name)
        try:
            record = self.registry.create_service(spec)
        except NameTaken as exc:
            raise Conflict(f"a service named {spec.name} exists already", "name") from exc
        self._runtime_of[spec.name] = runtime
        self.registry.set_version_status(spec.name, 1, "active")
        self.routing.add(ServiceRoute(spec.name, record.token, 1))
        if (ref := self.pulls.needed(spec)) is not None:  # fetched once, then the replicas start
            await lock.acquire()
            self._spawn(self._pull_then_deploy(spec, ref), lock)
            return record
        async with lock:
            await runtime.deploy(spec, 1)
        return record

    async def _pull_then_deploy(self, spec: ServiceSpec, ref: ModelRef) -> None:
        name = spec.name
        self.busy[name] = "pulling"
        self._refresh(name)
        why = await self.pulls.fetch_for(spec, self._pull_event(name), ref)
        self.busy.pop(name, None)
        if why is not None:
            self.registry.set_version_status(name, 1, "failed")
            self.registry.update_service(name, status="failed")
            return
        await self.runtime_of(name).deploy(spec, 1)
        self._refresh(name)

    def _pull_event(self, name: str) -> Callable[[str], None]:
        return lambda message: self.registry.add_event(name, "pull", message)

    async def update(self, name: str, changes: dict[str, object]) -> int:
        """Record the next version and roll it out in the background; returns its number."""
        record = self.registry.get(name)
        old = self.specs.get(name, record.current_version)
        new = merge_update(old, changes)
        if new == old:
            raise InvalidRequest("the update changes nothing", next(iter(changes), None))
        if new.runtime != old.runtime:
            raise InvalidRequest("runtime: a service keeps its runtime (deploy a new service)", "runtime")
        await self.runtime_of(name).prepare(new, old, running=record.desired == "running")
        lock = self._lock(name)
        await lock.acquire()
        version = self.registry.add_version(name, new)
        self.specs.put(name, version, new)
        self.registry.add_event(name, "update", f"version {version}: {changes_between(old, new)}")
        if record.desired != "running":
            self._switch(name, version, record.current_version, new)
            lock.release()
            return version
        self.busy[name] = "updating"
        self.registry.update_service(name, status="updating")
        work = self._roll_out(name, version, record.current_version, new, scales_only(old, new))
        self._spawn(work, lock)
        return version

    async def _roll_out(self, name: str, version: int, previous: int, spec: ServiceSpec, scale: bool) -> None:
        runtime = self.runtime_of(name)

        def switch() -> None:
            self._switch(name, version, previous, spec)

        try:
            if scale:
                why = await runtime.scale(name, version, previous, spec, switch)
            else:
                why = await self.pulls.fetch_for(spec, self._pull_event(name))
                why = why or await runtime.roll_out(name, version, previous, spec, switch)
            if why is not None:
                self.registry.set_version_status(name, version, "failed")
                self.registry.add_event(
                    name, "update", f"version {version} failed, version {previous} keeps serving: {why}"
                )
        finally:
            self.busy.pop(name, None)
            self._refresh(name)

    def _switch(self, name: str, version: int, previous: int, spec: ServiceSpec) -> None:
        """Make `version` the one the gateway serves (and the one the next start uses)."""
        assert spec.token
        self.registry.update_service(name, current_version=version, token=spec.token)
        self.registry.set_version_status(name, version, "active")
        if previous != version:
            self.registry.set_version_status(name, previous, "superseded")
        self.routing.switch(name, version, spec.token)
        self.registry.add_event(name, "switch", f"now serving version {version}")

    async def stop(self, name: str) -> ServiceRecord:
        record = self.registry.get(name)
        if record.desired == "stopped":
            raise Conflict(f"service {name} is stopped already")
        async with self._lock(name):
            await self._stop(name)
        return self.registry.get(name)

    async def _stop(self, name: str) -> None:
        self.busy[name] = "stopping"
        try:
            self.registry.update_service(name, desired="stopped", status="stopping")
            self.routing.close(name, stopped_message(name))
            await self.runtime_of(name).stop(name)
            self.registry.add_event(name, "stop", "stopped")
        finally:
            self.busy.pop(name, None)
            self._refresh(name)

    async def start(self, name: str) -> ServiceRecord:
        record = self.registry.get(name)
        if record.desired == "running" and record.status != "failed":
            raise Conflict(f"service {name} is running already")
        async with self._lock(name):
            spec = self.specs.get(name, record.current_version)
            self.registry.update_service(name, desired="running", status="deploying")
            self.routing.reopen(name)
            await self.runtime_of(name).start(name, record.current_version, spec)
            self.registry.add_event(
                name, "start", f"starting {spec.replicas} replica(s) of version {record.current_version}"
            )
        return self.registry.get(name)

    async def delete(self, name: str) -> None:
        runtime = self.runtime_of(name)
        async with self._lock(name):
            await self._stop(name)
            runtime.forget(name)
            self.routing.remove(name)
            self.registry.delete_service(name)
            self.specs.forget(name)
            for path in (self.config.log_dir(name), self.config.data_dir(name)):
                shutil.rmtree(path, ignore_errors=True)
        self._locks.pop(name, None)
        self._runtime_of.pop(name, None)

    # reading -------------------------------------------------------------------------------------
    def describe(self, name: str) -> dict[str, Any]:
        record = self.registry.get(name)
        spec = self.specs.get(name, record.current_version)
        endpoint = self.config.endpoint(name)
        return {
            **self.summary(record),
            "spec": spec.public(),
            "token": record.token,
            "invocation": invocation(endpoint, record.token),
            "instances": self.runtime_of(name).instances(name, record.current_version),
            "versions": [version_json(v) for v in self.registry.versions(name)],
            "pull": pull.as_dict() if (pull := self.pulls.of(spec)) else None,
            "events": [event_json(e) for e in self.registry.events(name)],
        }

    def summary(self, record: ServiceRecord) -> dict[str, Any]:
        spec = self.specs.get(record.name, record.current_version)
        ready = self.runtime_of(record.name).ready(record.name, record.current_version)
        return service_summary(record, spec, ready, self.config.endpoint(record.name))

    def list(self) -> list[dict[str, Any]]:
        return [self.summary(r) for r in self.registry.services()]
