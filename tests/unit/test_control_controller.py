"""The controller's verbs over recording runtimes: each verb reaches the runtime the service's
spec names and no other, through the ServiceRuntime interface alone; what every service has
(database rows, versions, the gateway's route) the controller does itself."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import easllm.control.controller as controller_module
from easllm.control.config import ConsoleConfig
from easllm.control.controller import Controller
from easllm.control.registry import Registry, ServiceRecord
from easllm.control.routing import ReplicaState
from easllm.control.runtimes.base import ServiceRuntime, Switch
from easllm.control.spec import ServiceSpec, parse_spec


class RecordingRuntime:
    """Implements ServiceRuntime by writing down each call; `outcome` is what a roll-out returns."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.calls: list[tuple[Any, ...]] = []
        self.outcome: str | None = None

    async def adopt(self, record: ServiceRecord) -> None:
        self.calls.append(("adopt", record.name))

    def open(self) -> None:
        self.calls.append(("open",))

    async def close(self) -> None:
        self.calls.append(("close",))

    async def prepare(self, spec: ServiceSpec, old: ServiceSpec | None = None, running: bool = True) -> None:
        self.calls.append(("prepare", spec.name, old is not None, running))

    async def deploy(self, spec: ServiceSpec, version: int) -> None:
        self.calls.append(("deploy", spec.name, version))

    async def roll_out(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        self.calls.append(("roll_out", name, version, previous))
        if self.outcome is None:
            switch()
        return self.outcome

    async def scale(
        self, name: str, version: int, previous: int, spec: ServiceSpec, switch: Switch
    ) -> str | None:
        self.calls.append(("scale", name, version, previous, spec.replicas))
        switch()
        return None

    async def stop(self, name: str) -> None:
        self.calls.append(("stop", name))

    async def start(self, name: str, version: int, spec: ServiceSpec) -> None:
        self.calls.append(("start", name, version))

    def forget(self, name: str) -> None:
        self.calls.append(("forget", name))

    def refresh_status(self, name: str) -> str:
        record = self.registry.get(name)
        status = "stopped" if record.desired == "stopped" else "running"
        self.registry.update_service(name, status=status)
        return status

    def ready(self, name: str, version: int) -> int:
        return 7

    def instances(self, name: str, version: int) -> list[dict[str, Any]]:
        return [{"id": "fake-1", "version": version}]

    def suspect(self, replica: ReplicaState) -> None:
        self.calls.append(("suspect", replica.service, replica.id))

    def verbs(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[Controller, RecordingRuntime, RecordingRuntime]]:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    one, other = RecordingRuntime(registry), RecordingRuntime(registry)
    config = ConsoleConfig(state_dir=tmp_path, admin_token="a" * 12)
    yield Controller(config, registry, runtimes={"local": one, "ray": other}), one, other
    registry.close()


def spec(**fields: Any) -> ServiceSpec:
    return parse_spec({"name": "svc", "engine": "fake", "replicas": 2, **fields})


async def settle(controller: Controller) -> None:
    await asyncio.gather(*controller._tasks)


def test_the_real_runtimes_and_the_recording_one_implement_the_interface(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    controller = Controller(ConsoleConfig(state_dir=tmp_path, admin_token="a" * 12), registry)
    assert sorted(controller.runtimes) == ["local", "ray"]
    for runtime in [*controller.runtimes.values(), RecordingRuntime(registry)]:
        assert isinstance(runtime, ServiceRuntime)
    registry.close()


def test_the_controller_names_no_runtime_but_where_it_builds_them() -> None:
    source = Path(controller_module.__file__).read_text()
    assert len(re.findall(r'"(?:local|ray)"', source)) == 2, "only the keys of the runtimes dict"
    assert "isinstance" not in source and "self.ray" not in source and ".runtime ==" not in source


async def test_deploy_reaches_the_runtime_the_spec_names_and_no_other(console) -> None:  # type: ignore[no-untyped-def]
    controller, local, ray = console
    await controller.deploy(spec())
    assert local.calls == [("prepare", "svc", False, True), ("deploy", "svc", 1)] and ray.calls == []
    await controller.deploy(spec(name="big", runtime="ray"))
    assert ray.calls == [("prepare", "big", False, True), ("deploy", "big", 1)] and len(local.calls) == 2
    route = controller.routing.route("big")
    assert route is not None and route.version == 1 and route.accepting
    described = controller.describe("big")
    assert described["instances"] == [{"id": "fake-1", "version": 1}]
    assert described["replicas"] == {"wanted": 2, "ready": 7}


async def test_a_replica_count_change_scales_and_any_other_change_rolls_out(console) -> None:  # type: ignore[no-untyped-def]
    controller, local, _ = console
    record = await controller.deploy(spec())
    assert await controller.update("svc", {"replicas": 3}) == 2
    await settle(controller)
    assert local.calls[-1] == ("scale", "svc", 2, 1, 3)
    assert await controller.update("svc", {"args": ["--max-new-tokens", "4"]}) == 3
    await settle(controller)
    assert local.calls[-1] == ("roll_out", "svc", 3, 2)
    assert [call[2:] for call in local.calls if call[0] == "prepare"][1:] == [(True, True), (True, True)]
    described = controller.describe("svc")
    assert described["version"] == 3 and described["status"] == "running"
    assert [v["status"] for v in described["versions"]] == ["superseded", "superseded", "active"]
    route = controller.routing.route("svc")
    assert route is not None and route.version == 3 and route.token == record.token


async def test_a_failed_roll_out_keeps_the_previous_version(console) -> None:  # type: ignore[no-untyped-def]
    controller, local, _ = console
    await controller.deploy(spec())
    local.outcome = "replica 4 failed: no room"
    await controller.update("svc", {"model": "gemma3-270m"})
    await settle(controller)
    described = controller.describe("svc")
    assert described["version"] == 1 and [v["status"] for v in described["versions"]] == ["active", "failed"]
    assert described["events"][-1]["message"] == (
        "version 2 failed, version 1 keeps serving: replica 4 failed: no room"
    )
    assert controller.routing.route("svc").version == 1  # type: ignore[union-attr]
    assert "svc" not in controller.busy


async def test_stop_start_update_while_stopped_and_delete(console) -> None:  # type: ignore[no-untyped-def]
    controller, local, ray = console
    await controller.deploy(spec(runtime="ray"))
    await controller.stop("svc")
    route = controller.routing.route("svc")
    assert route is not None and not route.accepting and "easllm start svc" in route.closed_reason
    assert ray.verbs()[-1] == "stop" and controller.registry.get("svc").status == "stopped"
    assert await controller.update("svc", {"replicas": 1}) == 2  # recorded; nothing runs
    assert ray.calls[-1] == ("prepare", "svc", True, False) and route.version == 2
    await controller.start("svc")
    assert ray.calls[-1] == ("start", "svc", 2) and route.accepting
    await controller.delete("svc")
    assert ray.verbs()[-2:] == ["stop", "forget"] and controller.routing.route("svc") is None
    assert controller.registry.services() == [] and local.calls == []


async def test_a_restarted_console_hands_each_service_back_to_its_runtime(console, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    controller, _, _ = console
    await controller.deploy(spec(name="near"))
    await controller.deploy(spec(name="far", runtime="ray"))
    local, ray = RecordingRuntime(controller.registry), RecordingRuntime(controller.registry)
    config = ConsoleConfig(state_dir=tmp_path, admin_token="a" * 12)
    again = Controller(config, controller.registry, runtimes={"local": local, "ray": ray})
    await again.open()
    assert local.calls == [("adopt", "near"), ("open",)] and ray.calls == [("adopt", "far"), ("open",)]
    assert {name for name in again.routing.routes} == {"near", "far"}
    far = ReplicaState(-1, "far", 1, 0, "")
    again.suspect(far)
    again.suspect(ReplicaState(5, "unknown", 1, 0, ""))  # not a service: nobody is told
    assert ray.calls[-1] == ("suspect", "far", -1) and local.verbs() == ["adopt", "open"]
    await again.close()
    assert local.verbs()[-1] == ray.verbs()[-1] == "close"
