"""`"runtime": "ray"`: each service is a Ray Serve application on the console's cluster.

Serve, not the supervisor, owns these replicas (ray_cluster.py talks to it). The
gateway sends their requests to one `RayEndpoint` per service, Serve's HTTP proxy under the
service's prefix, which balances over the replicas wherever they run. A loop reads
`serve.status()` and keeps the endpoint, the service's status and its events up to date; it also
deploys again an application that vanished from the cluster (a restarted cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from easllm.control.config import ConsoleConfig
from easllm.control.registry import Registry, ServiceRecord, UnknownService
from easllm.control.routing import ReplicaState, RoutingTable, gateway_prefix
from easllm.control.runtimes.base import Busy, Switch, busy_or_stopped
from easllm.control.runtimes.ray_cluster import RayAppState, RayCluster, RayUnavailable
from easllm.control.spec import ServiceSpec, SpecCache
from easllm.errors import InvalidRequest

log = logging.getLogger(__name__)
SCALE_FIELDS = {"replicas", "autoscaling"}  # changing only these scales; anything else rolls replicas
POLL = 0.5  # seconds between serve.status() reads
GONE_GRACE = 10.0  # an application missing this long after its deploy is deployed again


@dataclass(eq=False)
class RayEndpoint(ReplicaState):
    """Where the gateway sends a Ray service's requests: Serve's proxy, under the service prefix."""

    affinity_by_header: ClassVar[bool] = True  # Serve routes by `serve_multiplexed_model_id`
    base_url: str = ""

    @property
    def url(self) -> str:
        return self.base_url


def code_version(spec: ServiceSpec) -> str:
    """Serve's deployment `version`: it changes when anything but the replica count changes."""
    code = spec.model_dump_json(exclude=SCALE_FIELDS)
    return hashlib.sha256(code.encode()).hexdigest()[:12]


class RayRuntime:
    def __init__(
        self, config: ConsoleConfig, registry: Registry, routing: RoutingTable, specs: SpecCache, busy: Busy
    ) -> None:
        self.config = config
        self.registry = registry
        self.routing = routing
        self.specs = specs
        self.busy = busy
        self.cluster: RayCluster | None = None
        self.endpoints: dict[str, RayEndpoint] = {}
        self.states: dict[str, RayAppState | None] = {}
        self.replicas: dict[str, list[dict[str, Any]]] = {}
        self._deployed_at: dict[str, float] = {}  # when the console last ran each application
        self._ids = itertools.count(-1, -1)  # endpoints are no database rows: negative ids
        self._loop: asyncio.Task[None] | None = None

    # which cluster -----------------------------------------------------------------------------
    async def prepare(self, spec: ServiceSpec, old: ServiceSpec | None = None, running: bool = True) -> None:
        """400 unless this console can reach the cluster `spec` asks for (connecting if need be)."""
        wanted = spec.ray_address or self.config.ray_address
        if wanted is None:
            raise InvalidRequest(
                'runtime: "ray" needs a Ray cluster: start the console with --ray-address ADDRESS '
                "(or `local`), or give ray_address in the spec",
                "runtime",
            )
        if self.cluster is not None and wanted != self.cluster.address:
            raise InvalidRequest(
                f"ray_address: this console uses the Ray cluster at {self.cluster.address}, not {wanted}",
                "ray_address",
            )
        try:
            await self._cluster(spec).connect()
        except RayUnavailable as exc:
            raise InvalidRequest(f"ray_address: {exc}", "ray_address") from exc

    def _cluster(self, spec: ServiceSpec | None = None) -> RayCluster:
        if self.cluster is None:
            address = (spec.ray_address if spec else None) or self.config.ray_address
            assert address, "prepare() refuses ray services without a cluster"
            self.cluster = RayCluster(address, self.config.ray_serve_port)
        return self.cluster

    # life of the console -----------------------------------------------------------------------
    def open(self) -> None:
        """Start watching (and connecting, when the console was given a cluster)."""
        if self.config.ray_address:
            self._cluster()
        self._loop = asyncio.create_task(self._watch(), name="ray-services")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self.cluster is None:
            return
        if not self.config.keep_replicas and self.cluster.connected:
            for name in list(self.endpoints):  # as local replicas do, they stop with the console
                with contextlib.suppress(Exception):
                    await self.cluster.delete(name)
        await self.cluster.close()

    async def adopt(self, record: ServiceRecord) -> None:
        """A ray service from the database (console start): its endpoint; the loop redeploys it."""
        self._endpoint(record.name, record.current_version)
        self.states[record.name] = None
        if record.desired == "running":
            self._deployed_at[record.name] = 0.0  # "long ago": deployed again unless Serve runs it

    def _endpoint(self, name: str, version: int) -> RayEndpoint:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            endpoint = RayEndpoint(next(self._ids), name, version, 0, "", status="starting")
            self.endpoints[name] = endpoint
            self.routing.attach(endpoint)
        self._aim(endpoint)
        return endpoint

    def _aim(self, endpoint: RayEndpoint) -> None:
        """Point the endpoint at Serve's proxy, once the cluster is connected."""
        proxy = self.cluster.proxy_url if self.cluster else None
        if proxy and not endpoint.base_url:
            endpoint.base_url = f"{proxy}{gateway_prefix(endpoint.service)}"
            endpoint.port = urlsplit(proxy).port or 80

    # verbs (the controller holds the service's lock) ----------------------------------------------
    async def deploy(self, spec: ServiceSpec, version: int) -> None:
        self._endpoint(spec.name, version)
        await self._run(spec)
        self.registry.add_event(spec.name, "deploy", f"version {version} submitted to Ray Serve")

    async def _run(self, spec: ServiceSpec) -> None:
        await self._cluster(spec).deploy(
            spec,
            code_version(spec),
            self.config.data_dir(spec.name),
            self.config.startup_timeout,
            self.config.drain_timeout,
            self.config.routing_load_factor if self.config.routing == "prefix" else None,
        )
        self._deployed_at[spec.name] = time.monotonic()
        endpoint = self.endpoints.get(spec.name)
        if endpoint is not None:
            self._aim(endpoint)

    async def roll_out(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        """`serve.run` the new version; Serve replaces (or only adds and removes) replicas, keeping
        the old ones serving until the new ones are up. Failed: the previous version runs again."""
        try:
            await self._run(spec)
            why = await self._wait_running(name)
        except Exception as exc:  # the cluster went away mid-update
            why = f"{type(exc).__name__}: {exc}"
        if why is None:
            switch()
            self.endpoints[name].version = version
            return None
        try:
            await self._run(self.specs.get(name, previous))
        except Exception as exc:
            why += f"; running version {previous} again failed too: {type(exc).__name__}: {exc}"
        return why

    async def scale(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        """The same `serve.run`: an unchanged code version tells Serve to only add or remove replicas."""
        return await self.roll_out(name, version, previous, spec, switch)

    async def _wait_running(self, name: str) -> str | None:
        """None once Serve runs the configuration just submitted; else why not. (`serve.run`
        returns with the application DEPLOYING; RUNNING means every replica is on the new one.)"""
        assert self.cluster is not None
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            state = (await self.cluster.statuses()).get(name)
            if state is not None and state.status == "RUNNING":
                return None
            if state is not None and state.status == "DEPLOY_FAILED":
                return state.message or "Ray Serve could not deploy it"
            await asyncio.sleep(POLL)
        return f"Ray Serve did not run it within {self.config.startup_timeout:.0f}s"

    async def stop(self, name: str) -> None:
        """Requests in flight through the gateway finish, then the application goes."""
        endpoint = self.endpoints.get(name)
        if endpoint is not None:
            endpoint.draining = True
            await self.routing.drained([endpoint], self.config.drain_timeout)
        self._deployed_at.pop(name, None)
        if self.cluster is not None:
            await self.cluster.delete(name)
        if endpoint is not None:
            endpoint.status, endpoint.draining = "stopped", False
        self.states[name] = None

    async def start(self, name: str, version: int, spec: ServiceSpec) -> None:
        await self.prepare(spec)
        self._endpoint(name, version).version = version
        await self._run(spec)
        self.registry.add_event(name, "start", f"version {version} submitted to Ray Serve")

    def forget(self, name: str) -> None:
        endpoint = self.endpoints.pop(name, None)
        if endpoint is not None:
            self.routing.detach(endpoint)
        self.states.pop(name, None)
        self.replicas.pop(name, None)
        self._deployed_at.pop(name, None)

    # reading -----------------------------------------------------------------------------------
    def ready(self, name: str, version: int) -> int:
        state = self.states.get(name)
        return state.running if state is not None else 0

    def instances(self, name: str, version: int) -> list[dict[str, Any]]:
        endpoint = self.endpoints.get(name)
        port = endpoint.port if endpoint else 0
        return [
            {**r, "version": version, "port": port, "restarts": 0, "runtime": "ray"}
            for r in self.replicas.get(name, [])
        ]

    def suspect(self, replica: ReplicaState) -> None:
        """Serve checks its replicas' health itself; the loop reads what it finds."""

    def refresh_status(self, name: str) -> str:
        """Derive the service's status from Serve's and write it if it changed."""
        try:
            record = self.registry.get(name)
        except UnknownService:
            return "deleted"
        state = self.states.get(name)
        status = busy_or_stopped(record, self.busy) or _serve_status(state, record.status)
        if status != record.status:
            self.registry.update_service(name, status=status)
            if status in ("running", "failed"):
                detail = f"{state.running} replica(s) on Ray Serve" if state else ""
                self.registry.add_event(
                    name, status, state.message if status == "failed" and state else detail
                )
        return status

    # the loop ----------------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            try:
                await self._check_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading Ray Serve's status failed: %s", exc)
            await asyncio.sleep(POLL if self.endpoints else self.config.health_interval)

    async def _check_once(self) -> None:
        if self.cluster is None:
            return
        if not self.cluster.connected:
            await self.cluster.connect()
        states = await self.cluster.statuses()
        for name, endpoint in list(self.endpoints.items()):
            state = states.get(name)
            self._aim(endpoint)
            try:
                record = self.registry.get(name)
            except UnknownService:
                continue
            running = record.desired == "running" and name not in self.busy
            deployed = self._deployed_at.get(name)
            if (
                running
                and state is None
                and deployed is not None
                and time.monotonic() - deployed > GONE_GRACE
            ):
                self.registry.add_event(name, "restart", "the Serve application was gone; deployed again")
                await self._run(self.specs.get(name, record.current_version))
            self.states[name] = state
            self.replicas[name] = await self.cluster.replicas(name) if state is not None else []
            if record.desired == "running":
                endpoint.status = "ready" if state is not None and state.running else "starting"
            self.refresh_status(name)


def _serve_status(state: RayAppState | None, was: str) -> str:
    """A running service's status from its Serve application's (`was`: the status until now)."""
    if state is None or state.status in ("NOT_STARTED", "DELETING"):
        return "deploying"
    if state.status == "RUNNING":
        return "running"
    if state.status == "DEPLOY_FAILED" and not state.running:
        return "failed"
    if state.running:
        return "degraded" if was != "deploying" else "deploying"
    return "deploying" if was in ("deploying", "stopped") else "degraded"
