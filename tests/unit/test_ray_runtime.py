"""The Ray runtime without a cluster: what a spec becomes in Serve, the replica's readiness gate,
and the console's verbs for `"runtime": "ray"` services against an in-memory stand-in for Serve.

tests/integration/test_ray_serve.py runs the same verbs on a real Ray cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from easllm.app import create_app
from easllm.cli import build_parser
from easllm.config import ServerConfig
from easllm.control.config import ConsoleConfig
from easllm.control.controller import Controller
from easllm.control.registry import Registry
from easllm.control.runtimes import ray as ray_runtime
from easllm.control.runtimes.ray import RayEndpoint, RayRuntime, code_version
from easllm.control.runtimes.ray_cluster import RayAppState, deployment_options, init_options, serve_argv
from easllm.control.runtimes.ray_replica import REPLICA_HEADER, ReadyWhenLoaded, build_service_app
from easllm.control.spec import ServiceSpec, merge_update, parse_spec
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import ModelInfo
from easllm.errors import InvalidRequest
from easllm.server.state import state_of

ADDRESS = "10.0.0.1:6379"
PROXY = "http://127.0.0.1:8123"


def spec(**fields: Any) -> ServiceSpec:
    return parse_spec({"name": "svc", "engine": "fake", "runtime": "ray", "token": "t" * 12, **fields})


# -- what a spec becomes -------------------------------------------------------------------------


def test_replicas_and_resources_become_deployment_options() -> None:
    options = deployment_options(spec(replicas=3, resources={"cpu": 2, "memory": 4096, "gpu": 1}), 42.0)
    actor = options.pop("ray_actor_options")
    assert actor == {
        "num_cpus": 2,
        "num_gpus": 1,
        "memory": 4096 * 2**20,
        "runtime_env": {"env_vars": actor["runtime_env"]["env_vars"]},
    }
    assert "CUDA_VISIBLE_DEVICES" not in actor["runtime_env"]["env_vars"]  # the GPU is Ray's to assign
    assert options == {
        "name": "easllm",
        "num_replicas": 3,
        "max_ongoing_requests": 100,
        "graceful_shutdown_timeout_s": 42.0,
        "max_surge_percent": 1,
        "max_constructor_retry_count": 3,
        "request_router_config": {
            "request_router_class": "easllm.control.runtimes.ray_router.ConversationRouter",
            "request_router_kwargs": {"load_factor": 1.25},
        },
    }
    assert "request_router_config" not in deployment_options(spec(), 1.0, load_factor=None), (
        "--routing least-loaded: Serve's own power-of-two choices"
    )


def test_defaults_reserve_one_cpu_and_hide_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_HOME", "/srv/easllm")
    actor = deployment_options(spec(), 1.0)["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (1, 0) and "memory" not in actor
    env = actor["runtime_env"]["env_vars"]
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["EASLLM_HOME"] == "/srv/easllm"


def test_replicas_on_every_node_get_the_consoles_knowledge_base_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EASLLM_KB_DATABASE_URL", "postgresql+psycopg://kb@db-host/easllm")
    env = deployment_options(spec(), 1.0)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["EASLLM_KB_DATABASE_URL"] == "postgresql+psycopg://kb@db-host/easllm"


def test_autoscaling_replaces_the_replica_count() -> None:
    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4, "upscale_delay_s": 5}
    options = deployment_options(spec(replicas=5, autoscaling=scaling), 1.0)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "initial_replicas": 3,  # replicas, kept inside [min, max]
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 600.0,
    }


@pytest.mark.parametrize(
    "fields", [{"replicas": 2}, {"autoscaling": {"max_replicas": 4}}, {"resources": {"gpu": 1, "cpu": 3}}]
)
def test_ray_serve_accepts_the_options(fields: dict) -> None:
    """The option names exist in the installed Ray Serve (it refuses unknown or removed ones)."""
    from ray import serve

    from easllm.control.runtimes.ray_replica import ServiceReplica

    deployment = serve.deployment(serve.ingress()(ServiceReplica), **deployment_options(spec(**fields), 5.0))
    versioned = deployment.options(version="abc", _internal=True)
    assert versioned.version == "abc" and versioned.name == "easllm"


def test_replicas_get_the_local_runtimes_serve_flags(tmp_path: Path) -> None:
    argv = serve_argv(spec(args=["--api-only", "--max-new-tokens", "8"]), tmp_path)
    assert "--host" not in argv and "--port" not in argv
    args = build_parser().parse_args(["serve", *argv])
    assert (args.engine, args.service_name, args.root_path) == ("fake", "svc", "/api/predict/svc")
    assert args.cpu and args.api_only and args.max_new_tokens == 8 and args.data_dir == tmp_path


def test_vllm_on_several_gpus_is_tensor_parallel(tmp_path: Path) -> None:
    argv = serve_argv(parse_spec({"name": "big", "engine": "vllm", "resources": {"gpu": 4}}), tmp_path)
    args = build_parser().parse_args(["serve", *argv])
    assert args.tensor_parallel_size == 4 and not args.cpu
    with pytest.raises(InvalidRequest, match="--tensor-parallel-size is set by the console"):
        parse_spec({"name": "big", "args": ["--tensor-parallel-size", "2"]})


def test_the_code_version_ignores_only_the_replica_count() -> None:
    base = spec(replicas=2)
    assert code_version(base) == code_version(spec(replicas=5))
    assert code_version(base) == code_version(spec(replicas=2, autoscaling={"max_replicas": 4}))
    for other in ({"args": ["--max-new-tokens", "4"]}, {"token": "u" * 12}, {"model": "gemma3-270m"}):
        assert code_version(spec(replicas=2, **other)) != code_version(base)


@pytest.mark.parametrize(
    ("address", "node_ip"),
    [("127.0.0.1:6379", "127.0.0.1"), ("localhost:6379", "127.0.0.1"), (ADDRESS, None), ("auto", None)],
)
def test_ray_init_options(address: str, node_ip: str | None) -> None:
    options = init_options(address)
    assert options["address"] == address and options["namespace"] == "easllm"
    assert options.get("_node_ip_address") == node_ip


def test_a_local_cluster_is_private_and_on_loopback() -> None:
    options = init_options("local")
    assert "address" not in options
    assert options["include_dashboard"] is False and options["_node_ip_address"] == "127.0.0.1"


def test_ray_fields_need_runtime_ray() -> None:
    for field in ({"autoscaling": {"max_replicas": 2}}, {"ray_address": ADDRESS}):
        with pytest.raises(InvalidRequest) as info:
            parse_spec({"name": "svc", **field})
        assert info.value.param == next(iter(field)) and "runtime" in info.value.message
    with pytest.raises(InvalidRequest, match="min_replicas must not exceed max_replicas"):
        spec(autoscaling={"min_replicas": 3, "max_replicas": 2})
    scaled = merge_update(spec(autoscaling={"max_replicas": 4, "target_ongoing_requests": 8}), {
        "autoscaling": {"max_replicas": 6}
    })  # fmt: skip
    assert scaled.autoscaling is not None
    assert (scaled.autoscaling.max_replicas, scaled.autoscaling.target_ongoing_requests) == (6, 8.0)


# -- inside a replica ----------------------------------------------------------------------------


class SlowFake(FakeEngine):
    def __init__(self, load_time: float, fail: bool = False) -> None:
        super().__init__()
        self.load_time, self.fail = load_time, fail

    def _load(self) -> ModelInfo:
        time.sleep(self.load_time)
        if self.fail:
            raise RuntimeError("no such weights")
        return super()._load()


async def lifespan_startup(app: Any) -> tuple[dict, float]:
    """Drive an ASGI lifespan startup as Serve does; (the answer, seconds it took)."""
    sent: asyncio.Queue[dict] = asyncio.Queue()
    inbox: asyncio.Queue[dict] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    started = time.monotonic()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, sent.put))
    answer = await asyncio.wait_for(sent.get(), 10)
    took = time.monotonic() - started
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 10)
    return answer, took


async def test_a_replica_is_ready_only_once_the_model_loaded(tmp_path: Path) -> None:
    engine = SlowFake(load_time=0.5)
    app = ReadyWhenLoaded(create_app(ServerConfig(api_only=True, data_dir=tmp_path), engine), "r1", 10)
    answer, took = await lifespan_startup(app)
    assert answer["type"] == "lifespan.startup.complete" and took >= 0.5


async def test_a_model_that_fails_to_load_fails_the_replica(tmp_path: Path) -> None:
    engine = SlowFake(load_time=0.0, fail=True)
    app = ReadyWhenLoaded(create_app(ServerConfig(api_only=True, data_dir=tmp_path), engine), "r1", 10)
    answer, _ = await lifespan_startup(app)
    assert answer["type"] == "lifespan.startup.failed" and "no such weights" in answer["message"]


async def test_a_model_too_slow_to_load_fails_the_replica(tmp_path: Path) -> None:
    engine = SlowFake(load_time=1.0)
    app = ReadyWhenLoaded(create_app(ServerConfig(api_only=True, data_dir=tmp_path), engine), "r1", 0.2)
    answer, _ = await lifespan_startup(app)
    assert answer["type"] == "lifespan.startup.failed" and "did not load within" in answer["message"]


async def test_every_answer_names_its_replica(tmp_path: Path) -> None:
    inner = create_app(ServerConfig(api_only=True, data_dir=tmp_path), FakeEngine())
    app = ReadyWhenLoaded(inner, "replica-7", 10)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/live", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    start = sent[0]
    assert start["status"] == 200 and (REPLICA_HEADER, b"replica-7") in start["headers"]


def test_build_service_app_is_easllm_serve_with_the_token(tmp_path: Path) -> None:
    app = build_service_app(["--engine", "fake", "--api-only", "--service-name", "svc"], "s3cret-token")
    assert state_of(app).config.token == "s3cret-token" and state_of(app).config.service_name == "svc"
    assert isinstance(state_of(app).engine, FakeEngine)


# -- the console's verbs, against an in-memory Serve -----------------------------------------------


class MemoryServe:
    """Stands in for RayCluster: applications in a dict; each deploy runs at once unless told."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.proxy_url = PROXY
        self.connected = True
        self.apps: dict[str, RayAppState] = {}
        self.deploys: list[tuple[str, ServiceSpec, str]] = []
        self.deleted: list[str] = []
        self.fail_next = False

    async def connect(self) -> str:
        return self.proxy_url

    async def deploy(
        self,
        spec: ServiceSpec,
        code: str,
        data_dir: Path,
        load: float,
        drain: float,
        load_factor: float | None,
    ) -> None:
        assert load_factor == 1.25, "prefix routing (the console's default) inside Serve too"
        self.deploys.append((spec.name, spec, code))
        n = spec.replicas if spec.autoscaling is None else spec.autoscaling.min_replicas
        if self.fail_next:
            self.fail_next = False
            self.apps[spec.name] = RayAppState("DEPLOY_FAILED", "the model did not load", {"RUNNING": n})
        else:
            self.apps[spec.name] = RayAppState("RUNNING", "", {"RUNNING": n})

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.apps.pop(name, None)

    async def statuses(self) -> dict[str, RayAppState]:
        return dict(self.apps)

    async def replicas(self, name: str) -> list[dict[str, Any]]:
        n = self.apps[name].running
        return [{"id": f"r{i}", "status": "RUNNING", "node": "10.0.0.2", "pid": 100 + i} for i in range(n)]

    async def close(self) -> None:
        self.connected = False


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[Controller, MemoryServe]]:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    config = ConsoleConfig(state_dir=tmp_path, admin_token="a" * 12, ray_address=ADDRESS, drain_timeout=1)
    controller = Controller(config, registry)
    serve = MemoryServe(ADDRESS)
    ray(controller).cluster = serve  # type: ignore[assignment]
    yield controller, serve
    registry.close()


def ray(controller: Controller) -> RayRuntime:
    runtime = controller.runtimes["ray"]
    assert isinstance(runtime, RayRuntime)
    return runtime


async def settle(controller: Controller) -> None:
    """One turn of the loop that reads Serve's status, then let background work finish."""
    await ray(controller)._check_once()
    await asyncio.gather(*controller._tasks)


async def test_deploy_runs_a_serve_app_behind_the_gateway(console) -> None:  # type: ignore[no-untyped-def]
    controller, serve = console
    await controller.deploy(spec(replicas=2))
    (name, deployed, code), = serve.deploys  # fmt: skip
    assert (name, deployed.replicas, code) == ("svc", 2, code_version(deployed))
    route = controller.routing.route("svc")
    assert route is not None
    (endpoint,) = route.replicas
    assert isinstance(endpoint, RayEndpoint) and endpoint.url == f"{PROXY}/api/predict/svc"
    await settle(controller)
    assert controller.routing.pick("svc") is endpoint and endpoint.port == 8123
    described = controller.describe("svc")
    assert described["status"] == "running" and described["replicas"] == {"wanted": 2, "ready": 2}
    assert [r["id"] for r in described["instances"]] == ["r0", "r1"]
    assert {r["runtime"] for r in described["instances"]} == {"ray"}
    assert [e["kind"] for e in described["events"]][-1] == "running"


async def test_ray_services_need_a_cluster(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    controller = Controller(ConsoleConfig(state_dir=tmp_path, admin_token="a" * 12), registry)
    with pytest.raises(InvalidRequest, match="--ray-address") as info:
        await controller.deploy(spec())
    assert info.value.param == "runtime" and registry.services() == []
    registry.close()


async def test_one_console_one_cluster(console) -> None:  # type: ignore[no-untyped-def]
    controller, _ = console
    with pytest.raises(InvalidRequest, match=r"uses the Ray cluster at 10\.0\.0\.1:6379") as info:
        await controller.deploy(spec(ray_address="10.9.9.9:6379"))
    assert info.value.param == "ray_address"


async def test_scaling_keeps_the_code_version_and_a_change_does_not(console) -> None:  # type: ignore[no-untyped-def]
    controller, serve = console
    await controller.deploy(spec(replicas=2))
    assert await controller.update("svc", {"replicas": 1}) == 2
    await settle(controller)
    assert await controller.update("svc", {"args": ["--max-new-tokens", "4"]}) == 3
    await settle(controller)
    codes = [code for _, _, code in serve.deploys]
    assert codes[0] == codes[1] != codes[2]
    described = controller.describe("svc")
    assert described["version"] == 3 and described["status"] == "running"
    assert [v["status"] for v in described["versions"]] == ["superseded", "superseded", "active"]


async def test_a_failed_update_keeps_the_previous_version(console) -> None:  # type: ignore[no-untyped-def]
    controller, serve = console
    await controller.deploy(spec())
    await settle(controller)
    serve.fail_next = True
    await controller.update("svc", {"model": "gemma3-270m"})
    await settle(controller)
    described = controller.describe("svc")
    assert described["version"] == 1 and [v["status"] for v in described["versions"]] == ["active", "failed"]
    assert "the model did not load" in described["events"][-2]["message"] + described["events"][-1]["message"]
    assert serve.deploys[-1][1].model == serve.deploys[0][1].model  # version 1 runs again


async def test_the_runtime_of_a_service_cannot_change(console) -> None:  # type: ignore[no-untyped-def]
    controller, _ = console
    await controller.deploy(spec())
    with pytest.raises(InvalidRequest) as info:
        await controller.update("svc", {"runtime": "local"})
    assert info.value.param == "runtime"


async def test_stop_start_and_delete_map_to_serve(console) -> None:  # type: ignore[no-untyped-def]
    controller, serve = console
    await controller.deploy(spec())
    await settle(controller)
    await controller.stop("svc")
    assert serve.deleted == ["svc"] and controller.registry.get("svc").status == "stopped"
    assert not controller.routing.route("svc").accepting  # type: ignore[union-attr]
    await controller.start("svc")
    await settle(controller)
    assert len(serve.deploys) == 2 and controller.registry.get("svc").status == "running"
    await controller.delete("svc")
    assert serve.deleted == ["svc", "svc"] and controller.routing.route("svc") is None
    assert "svc" not in ray(controller).endpoints


async def test_an_app_gone_from_the_cluster_is_deployed_again(console, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    controller, serve = console
    monkeypatch.setattr(ray_runtime, "GONE_GRACE", 0.0)
    await controller.deploy(spec())
    serve.apps.clear()  # e.g. the cluster restarted
    await settle(controller)
    assert len(serve.deploys) == 2 and "svc" in serve.apps
    last = controller.describe("svc")["events"][-1]
    assert last["kind"] == "restart" and "was gone" in last["message"]


# -- Serve's router for easllm services ------------------------------------------------------------


@dataclass
class FakeReplica:
    replica_id: Any


@dataclass(frozen=True)
class FakeReplicaId:
    unique_id: str


class FakeQueueLengths:
    def __init__(self, lengths: dict[str, int]) -> None:
        self.lengths = lengths

    def get(self, replica_id: FakeReplicaId) -> int | None:
        return self.lengths.get(replica_id.unique_id)


def serve_router(lengths: dict[str, int]) -> Any:
    from easllm.control.runtimes.ray_router import ConversationRouter

    router = object.__new__(ConversationRouter)  # Serve builds it with its own internals
    router.initialize_state(load_factor=1.25)
    router._replica_queue_len_cache = FakeQueueLengths(lengths)
    return router


def pending(name: str) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=name))


async def test_serve_routes_a_conversation_by_the_gateways_ring_with_bounded_load() -> None:
    pytest.importorskip("ray.serve.request_router")
    replicas = [FakeReplica(FakeReplicaId(i)) for i in ("abc", "def", "ghi")]
    router = serve_router({"abc": 0, "def": 0, "ghi": 0})
    ranks = await router.choose_replicas(replicas, pending("conversation:k1"))
    home = ranks[0][0]
    assert len(ranks[0]) == 1 and sorted(r.replica_id.unique_id for r in ranks[1]) == sorted(
        r.replica_id.unique_id for r in replicas if r is not home
    )
    for _ in range(3):
        assert (await router.choose_replicas(replicas, pending("conversation:k1")))[0][0] is home
    router._replica_queue_len_cache.lengths[home.replica_id.unique_id] = 5  # far above the average
    assert (await router.choose_replicas(replicas, pending("conversation:k1")))[0][0] is not home
    session_home = (await router.choose_replicas(replicas, pending("session:s1")))[0][0]
    router._replica_queue_len_cache.lengths[session_home.replica_id.unique_id] = 50
    assert (await router.choose_replicas(replicas, pending("session:s1")))[0][0] is session_home, (
        "a browser session stays however busy its replica is"
    )
    unnamed = await router.choose_replicas(replicas, pending(""))
    assert len(unnamed) == 1 and unnamed[0][0].replica_id.unique_id != session_home.replica_id.unique_id
