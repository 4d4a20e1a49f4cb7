"""Ray Serve's replica choice for easllm services: the gateway's routing, inside Serve.

Serve's proxy, not the console's gateway, picks a Ray service's replica, so the gateway names what
belongs together in Serve's `serve_multiplexed_model_id` header (the proxy puts it in the
request's metadata) and this router — the deployment's `request_router_class` — maps the name
onto the same consistent-hash ring as the gateway (affinity.py):

    session:<id>         a browser's WebUI session: always its replica on the ring while it runs
    conversation:<key>   a conversation: its replica on the ring unless that one is beyond
                         `load_factor` x the average requests in flight (then the next on the ring)

Requests without a name, and the fall-backs, are ranked after it by requests in flight. Serve
tries the ranks in order and moves on when a replica is full (`max_ongoing_requests`). Loaded by
Serve in its own processes (by class path), never by the console.
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from easllm.control.affinity import HashRing

SESSION_PREFIX = "session:"
CONVERSATION_PREFIX = "conversation:"


class ConversationRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, load_factor: float = 1.25, **_: object) -> None:
        self.load_factor = load_factor
        self._rings: dict[frozenset[str], HashRing[str]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        name = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        by_load = sorted(candidate_replicas, key=self._load)
        if not name or len(candidate_replicas) < 2:
            return [by_load]
        replicas = {r.replica_id.unique_id: r for r in candidate_replicas}
        ring = self._ring(frozenset(replicas))
        if name.startswith(SESSION_PREFIX):
            first = next(ring.walk(name))
        else:
            loads = {rid: self._load(r) for rid, r in replicas.items()}
            first = ring.pick(name, loads, getattr(self, "load_factor", 1.25)) or next(ring.walk(name))
        return [[replicas[first]], [r for r in by_load if r.replica_id.unique_id != first]]

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _ring(self, members: frozenset[str]) -> HashRing[str]:
        rings = getattr(self, "_rings", None)
        if rings is None:
            rings = self._rings = {}
        if members not in rings:
            if len(rings) > 64:
                rings.clear()
            rings[members] = HashRing(members)
        return rings[members]
