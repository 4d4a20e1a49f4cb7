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


def test_a_pinned_session_stays_on_its_replica_until_it_stops_serving() -> None:
    routing, (a, b) = table("ready", "ready")
    with routing.lease(b), routing.lease(b):
        assert routing.pick("svc", pinned=b.id) is b, "affinity beats load"
    b.draining = True
    assert routing.pick("svc", pinned=b.id) is a
    assert routing.pick("svc", pinned=999) is a, "an unknown replica id is ignored"


def test_prefix_policy_keeps_a_conversation_on_one_replica() -> None:
    routing, replicas = table("ready", "ready", "ready")
    homes = {f"conversation-{i}": routing.pick("svc", key=f"conversation-{i}").id for i in range(30)}
    for _ in range(3):
        assert all(routing.pick("svc", key=k).id == home for k, home in homes.items())
    assert len(set(homes.values())) == 3, "conversations spread over the replicas"
    home = next(r for r in replicas if r.id == homes["conversation-0"])
    with routing.lease(home), routing.lease(home), routing.lease(home):
        assert routing.pick("svc", key="conversation-0") is not home, "beyond the load bound it moves"
    assert routing.pick("svc", key="conversation-0", exclude={home.id}) is not home


def test_least_loaded_policy_ignores_the_key() -> None:
    routing = RoutingTable(policy="least-loaded")
    replicas = [ReplicaState(i, "svc", 1, 40000 + i, "/tmp/r.log", status="ready") for i in (1, 2)]
    routing.add(ServiceRoute("svc", "t", 1, replicas=replicas))
    assert sorted(routing.pick("svc", key="same").id for _ in range(4)) == [1, 1, 2, 2]


@pytest.mark.parametrize(("policy", "factor"), [("random", 1.25), ("prefix", 0.5)])
def test_bad_routing_settings_are_refused(policy: str, factor: float) -> None:
    with pytest.raises(ValueError, match="routing"):
        RoutingTable(policy, factor)
