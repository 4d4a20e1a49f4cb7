"""The gateway's view of the world: each service's token, version and replicas, and who is busy.

Everything here runs on the console's event loop, so picking a replica and counting the request
against it happen in one step: a replica chosen is never stopped before it is drained.

How a replica is picked, first that applies: the replica a browser session is pinned to (its
affinity cookie) while it serves; with the `prefix` policy, the replica the conversation's key
hashes to on the ring, unless that would load it beyond `load_factor` x the average
(affinity.py); else the replica with the fewest requests in flight (ties: round-robin).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from easllm.control.affinity import HashRing

POLICIES = ("prefix", "least-loaded")


def gateway_prefix(service: str) -> str:
    """Where the gateway serves `service` (and where its replicas believe they are served)."""
    return f"/api/predict/{service}"


@dataclass(eq=False)
class ReplicaState:
    """One replica, in memory; `id` is its database row."""

    # False: the gateway picks this replica itself. True (a Ray Serve endpoint): Serve picks among
    # the replicas behind it, told a request's affinity name in a header.
    affinity_by_header: ClassVar[bool] = False
    id: int
    service: str
    version: int
    port: int
    log_path: str
    pid: int | None = None
    pid_started: str | None = None
    status: str = "starting"  # starting ready unhealthy crashed draining failed stopped
    restarts: int = 0
    exit_code: int | None = None
    outstanding: int = 0  # requests the gateway has in flight on it
    served: int = 0  # requests the gateway sent it, ever
    draining: bool = False
    ever_ready: bool = False
    failed_starts: int = 0  # starts in a row that died before becoming ready
    started_at: float = 0.0  # time.monotonic() of the last start (or reattach)
    ready_since: float | None = None
    down_since: float | None = None
    restart_at: float | None = None
    detail: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def serving(self) -> bool:
        return self.status == "ready" and not self.draining


@dataclass(eq=False)
class ServiceRoute:
    name: str
    token: str
    version: int
    accepting: bool = True  # False when stopped: requests get 503 with `closed_reason`
    closed_reason: str = ""
    replicas: list[ReplicaState] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def serving(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.version == self.version and r.serving]


class NoReplica(LookupError):
    """No replica can take the request now; the message says why."""


class RoutingTable:
    def __init__(self, policy: str = "prefix", load_factor: float = 1.25) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}")
        if load_factor < 1.0:
            raise ValueError("the routing load factor must be at least 1.0")
        self.policy = policy
        self.load_factor = load_factor
        self.routes: dict[str, ServiceRoute] = {}
        self._turn = itertools.count()
        self._rings: dict[frozenset[int], HashRing[int]] = {}

    def route(self, name: str) -> ServiceRoute | None:
        return self.routes.get(name)

    def add(self, route: ServiceRoute) -> None:
        self.routes[route.name] = route

    def remove(self, name: str) -> None:
        self.routes.pop(name, None)

    # what the controller and the runtimes change: the one place that writes a route ----------------
    def attach(self, replica: ReplicaState) -> None:
        """`replica` takes its service's requests whenever it serves (ready, not draining)."""
        route = self.routes.get(replica.service)
        if route is not None and replica not in route.replicas:
            route.replicas.append(replica)

    def detach(self, replica: ReplicaState) -> None:
        route = self.routes.get(replica.service)
        if route is not None and replica in route.replicas:
            route.replicas.remove(replica)

    def switch(self, name: str, version: int, token: str) -> None:
        """Requests now go to `version`'s replicas and need `token`."""
        route = self.routes.get(name)
        if route is not None:
            route.version, route.token = version, token

    def close(self, name: str, reason: str) -> None:
        """Requests get 503 with `reason` (a stopped service)."""
        route = self.routes.get(name)
        if route is not None:
            route.accepting, route.closed_reason = False, reason

    def reopen(self, name: str) -> None:
        route = self.routes.get(name)
        if route is not None:
            route.accepting = True

    def pick(
        self,
        name: str,
        exclude: set[int] | frozenset[int] = frozenset(),
        key: str | None = None,
        pinned: int | None = None,
    ) -> ReplicaState:
        """The replica for a request: the `pinned` one while it serves, else by `key` on the ring
        (prefix policy, bounded load), else the one with the fewest requests in flight."""
        route = self.routes[name]
        if not route.accepting:
            raise NoReplica(route.closed_reason or f"service {name} is stopped")
        candidates = [r for r in route.serving() if r.id not in exclude]
        if not candidates:
            raise NoReplica(f"service {name} has no ready replica yet; retry shortly")
        if pinned is not None:
            for r in candidates:
                if r.id == pinned:
                    return r
        if key is not None and self.policy == "prefix" and len(candidates) > 1:
            chosen = self._ring(candidates).pick(
                key, {r.id: r.outstanding for r in candidates}, self.load_factor
            )
            for r in candidates:
                if r.id == chosen:
                    return r
        return self._least_loaded(candidates)

    def _ring(self, candidates: list[ReplicaState]) -> HashRing[int]:
        members = frozenset(r.id for r in candidates)
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) > 64:  # replica sets come and go with updates: keep a few
                self._rings.clear()
            ring = self._rings[members] = HashRing(members)
        return ring

    def _least_loaded(self, candidates: list[ReplicaState]) -> ReplicaState:
        least = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == least]
        return tied[next(self._turn) % len(tied)]

    @contextmanager
    def lease(self, replica: ReplicaState) -> Iterator[ReplicaState]:
        replica.outstanding += 1
        replica.served += 1
        try:
            yield replica
        finally:
            replica.outstanding -= 1

    async def drained(self, replicas: list[ReplicaState], timeout: float) -> bool:
        """Wait until none of `replicas` has a request in flight; False if `timeout` ran out."""
        deadline = time.monotonic() + timeout
        while any(r.outstanding for r in replicas):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
