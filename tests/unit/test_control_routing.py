"""The gateway's routing table: least outstanding requests, round-robin ties, draining, closed services."""

import asyncio

import pytest

from easllm.control.routing import NoReplica, ReplicaState, RoutingTable, ServiceRoute


def table(*statuses: str, version: int = 1) -> tuple[RoutingTable, list[ReplicaState]]:
    routing = RoutingTable()
    replicas = [
        ReplicaState(i + 1, "svc", version, 40000 + i, f"/tmp/r{i}.log", status=s)
        for i, s in enumerate(statuses)
    ]
    routing.add(ServiceRoute("svc", "token-123", version, replicas=list(replicas)))
    return routing, replicas


def test_ties_go_round_robin() -> None:
    routing, _replicas = table("ready", "ready", "ready")
    picked = [routing.pick("svc").id for _ in range(6)]
    assert sorted(picked) == [1, 1, 2, 2, 3, 3]


def test_the_least_busy_replica_is_picked() -> None:
    routing, (a, b) = table("ready", "ready")
    with routing.lease(a), routing.lease(a), routing.lease(b):
        assert routing.pick("svc") is b
        assert (a.outstanding, b.outstanding) == (2, 1)
    assert a.outstanding == b.outstanding == 0 and (a.served, b.served) == (2, 1)


def test_only_ready_replicas_of_the_served_version_are_picked() -> None:
    routing, (_starting, ready, draining, old) = table("starting", "ready", "ready", "ready")
    draining.draining = True
    old.version = 0
    assert {routing.pick("svc").id for _ in range(5)} == {ready.id}
    with pytest.raises(NoReplica, match="no ready replica"):
        routing.pick("svc", exclude={ready.id})


def test_a_stopped_service_says_why() -> None:
    routing, _ = table("ready")
    route = routing.route("svc")
    assert route is not None
    route.accepting, route.closed_reason = False, "service svc is stopped: start it with `easllm start svc`"
    with pytest.raises(NoReplica, match="easllm start svc"):
        routing.pick("svc")


async def test_drained_waits_for_in_flight_requests() -> None:
    routing, (a,) = table("ready")

    async def request() -> None:
        with routing.lease(a):
            await asyncio.sleep(0.2)

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    assert not await routing.drained([a], timeout=0.05)
    assert await routing.drained([a], timeout=2)
    await task
