"""What the controller asks of a runtime: the one interface behind which replicas run.

A service's spec names its runtime (`"runtime": "local"` or `"ray"`); the controller picks that
runtime once and then only calls these verbs, so a new place to run replicas is one new class
(see docs/ARCHITECTURE.md). The controller keeps what every service has: its database rows, its
lock, its version switch and the gateway's route. A runtime keeps its replicas; it tells the
gateway about them through the routing table (`attach`, `detach`) and writes the service's
status (`refresh_status`), which shows `busy` (what the controller is doing now) first.

Every verb runs on the console's event loop, and the controller holds the service's lock while
one runs, so a runtime sees one verb per service at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from easllm.control.registry import ServiceRecord
from easllm.control.routing import ReplicaState
from easllm.control.spec import ServiceSpec

Switch = Callable[[], None]  # makes the version being rolled out the one the gateway serves
Busy = Mapping[str, str]  # service -> "pulling" | "updating" | "stopping", read by the runtimes


def busy_or_stopped(record: ServiceRecord, busy: Busy) -> str | None:
    """The status that overrides what the replicas say: the controller's work, or stopped."""
    if record.name in busy:
        return busy[record.name]
    return "stopped" if record.desired == "stopped" else None


@runtime_checkable
class ServiceRuntime(Protocol):
    # life of the console -----------------------------------------------------------------------
    async def adopt(self, record: ServiceRecord) -> None:
        """Console start: take back a service from the database (reattach, restart or redeploy)."""

    def open(self) -> None:
        """Start watching the replicas (after every service was adopted)."""

    async def close(self) -> None:
        """Stop watching; stop the replicas unless the console keeps them (`keep_replicas`)."""

    # verbs ---------------------------------------------------------------------------------------
    async def prepare(self, spec: ServiceSpec, old: ServiceSpec | None = None, running: bool = True) -> None:
        """InvalidRequest naming the field unless `spec` can run here: deployed new, or (`old`) as
        the next version of a service that runs now (`running`) or starts later."""

    async def deploy(self, spec: ServiceSpec, version: int) -> None:
        """Start `version` of a new service (the controller recorded it and its route)."""

    async def roll_out(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        """Replace `previous`'s replicas with `version`'s without failing a request: `switch` once
        the new ones serve. None when done; else why not (then `previous` keeps serving)."""

    async def scale(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        """As `roll_out`, for a `spec` that differs in its replica count only."""

    async def stop(self, name: str) -> None:
        """Drain and stop the service's replicas (the gateway refuses new requests already)."""

    async def start(self, name: str, version: int, spec: ServiceSpec) -> None:
        """Start a stopped (or failed) service's replicas of `version` again."""

    def forget(self, name: str) -> None:
        """The service is deleted (and stopped): drop what is kept of it."""

    # reading -------------------------------------------------------------------------------------
    def refresh_status(self, name: str) -> str:
        """Derive the service's status from its replicas, write it if it changed, return it."""

    def ready(self, name: str, version: int) -> int:
        """How many replicas of `version` serve now."""

    def instances(self, name: str, version: int) -> list[dict[str, Any]]:
        """The replicas, as `describe` shows them."""

    def suspect(self, replica: ReplicaState) -> None:
        """The gateway could not reach `replica`: look at it soon."""
