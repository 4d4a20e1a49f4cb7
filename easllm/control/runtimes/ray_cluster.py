"""The console's link to a Ray cluster: each service is one Ray Serve application.

The application is one deployment whose replicas run `easllm serve`'s own app and engine
(runtimes/ray_replica.py), under the route prefix the gateway serves it at, so the gateway sends
`/api/predict/<name>/...` to Serve's HTTP proxy unchanged and streams and WebSockets pass
through. Serve owns the replicas: `num_replicas` or `autoscaling_config` and `ray_actor_options`
come from the spec, an update is `serve.run` with a new deployment version (Serve rolls the
replicas; a change of replicas alone keeps the version, so Serve only scales), stop and delete
are `serve.delete`, and status is `serve.status()`.

Ray is imported here only, and every Ray call runs on one worker thread: they block, and Ray
prefers one caller. The console is a Ray driver: it connects with `ray.init(address=...)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from easllm.control.routing import gateway_prefix
from easllm.control.runtimes.processes import serve_command
from easllm.control.spec import ServiceSpec

log = logging.getLogger(__name__)
NAMESPACE = "easllm"
DEPLOYMENT = "easllm"  # the one deployment of each service's application
MAX_ONGOING_REQUESTS = 100  # per replica; an open WebSocket counts as one for its whole life
PASSED_ENV = (
    "EASLLM_HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "EASLLM_LOG_LEVEL",
    "EASLLM_KB_DATABASE_URL",  # the knowledge base every replica, on any node, shares
)
LOCAL = "local"  # --ray-address local: a private single-node cluster inside the console
ROUTER = "easllm.control.runtimes.ray_router.ConversationRouter"  # Serve imports it by this path


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass(frozen=True)
class RayAppState:
    """One Serve application, as `serve.status()` tells it."""

    status: str  # NOT_STARTED DEPLOYING DEPLOY_FAILED RUNNING UNHEALTHY DELETING
    message: str = ""
    replicas: dict[str, int] = field(default_factory=dict)  # replica state -> how many
    deployed_at: float | None = None  # when Serve took the last `serve.run`

    @property
    def running(self) -> int:
        return self.replicas.get("RUNNING", 0)


def serve_argv(spec: ServiceSpec, data_dir: Path) -> list[str]:
    """The `easllm serve` flags of a replica: a local replica's command, without the socket."""
    cmd = serve_command(spec, 0, data_dir)
    argv = cmd[cmd.index("serve") + 1 :]
    for flag in ("--host", "--port"):
        at = argv.index(flag)
        del argv[at : at + 2]
    return argv


def replica_env(spec: ServiceSpec) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    if spec.resources.gpu == 0 and spec.engine != "vllm":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def deployment_options(
    spec: ServiceSpec, drain_timeout: float, load_factor: float | None = 1.25
) -> dict[str, Any]:
    """`serve.deployment(...)` options of `spec`: replicas or autoscaling, resources, draining,
    and the router (the gateway's conversation routing with `load_factor`; None: Serve's own)."""
    actor: dict[str, Any] = {"num_cpus": spec.resources.cpu or 1, "num_gpus": spec.resources.gpu}
    if spec.resources.memory:
        actor["memory"] = spec.resources.memory * 2**20  # Ray counts bytes
    actor["runtime_env"] = {"env_vars": replica_env(spec)}
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": actor,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "graceful_shutdown_timeout_s": drain_timeout,  # in-flight requests finish before a replica goes
        "max_surge_percent": 1,  # an update starts one new replica before stopping an old one
        "max_constructor_retry_count": 3,  # a model that cannot load fails the deploy soon
    }
    if load_factor is not None:
        options["request_router_config"] = {
            "request_router_class": ROUTER,
            "request_router_kwargs": {"load_factor": load_factor},
        }
    scaling = spec.autoscaling
    if scaling is None:
        options["num_replicas"] = spec.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "initial_replicas": min(max(spec.replicas, scaling.min_replicas), scaling.max_replicas),
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    return options


def init_options(address: str) -> dict[str, Any]:
    """`ray.init` keywords: a private head for `local`, else a driver of the cluster at `address`."""
    options: dict[str, Any] = {
        "namespace": NAMESPACE,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address == LOCAL:
        options.update(include_dashboard=False, _node_ip_address="127.0.0.1")
        return options
    options["address"] = address
    host = urlsplit(f"//{address.removeprefix('ray://')}").hostname or ""
    if host in ("127.0.0.1", "localhost"):  # Ray swaps loopback for the machine's address, except in
        # a network namespace that has only loopback: then the driver must say so too
        options["_node_ip_address"] = "127.0.0.1"
    return options


class RayCluster:
    """The console's link to one Ray cluster and its Serve instance."""

    def __init__(self, address: str, serve_port: int = 8000, serve_host: str = "127.0.0.1") -> None:
        self.address = address
        self.serve_port = serve_port
        self.serve_host = serve_host
        self.proxy_url: str | None = None  # Serve's HTTP proxy, once connected
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray")
        self._connecting: asyncio.Future[None] | None = None

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    @property
    def connected(self) -> bool:
        return self.proxy_url is not None

    async def connect(self) -> str:
        """Join the cluster and start Serve (once; concurrent callers share it); the proxy URL."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._call(self._connect))
        try:
            await asyncio.shield(self._connecting)
        except BaseException:
            self._connecting = None  # the next verb tries again
            raise
        assert self.proxy_url is not None
        return self.proxy_url

    def _connect(self) -> None:
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise RayUnavailable("runtime ray needs Ray Serve: pip install 'easllm[ray]'") from exc
        try:
            if not ray.is_initialized():
                ray.init(**init_options(self.address))
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": self.serve_host, "port": self.serve_port},
            )
        except Exception as exc:
            raise RayUnavailable(f"cannot use the Ray cluster at {self.address}: {exc}") from exc
        host, port = self._proxy_address()
        self.proxy_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        log.info("Ray cluster %s: Serve's proxy at %s", self.address, self.proxy_url)

    def _proxy_address(self) -> tuple[str, int]:
        """Where Serve's proxy listens: ours, or what an earlier console started it with."""
        try:
            from ray.serve.context import _get_global_client

            client = _get_global_client()
            if client is None:
                raise LookupError("Serve is not started")
            return client.http_config.host, int(client.http_config.port)
        except Exception:  # private API: fall back to what we asked for
            return self.serve_host, self.serve_port

    async def close(self) -> None:
        """Leave the cluster (Serve applications stay; a private `local` cluster ends)."""
        if self.connected:
            import ray

            await self._call(ray.shutdown)
            self.proxy_url = None
        self._pool.shutdown(wait=False)

    async def deploy(
        self,
        spec: ServiceSpec,
        code_version: str,
        data_dir: Path,
        load_timeout: float,
        drain_timeout: float,
        load_factor: float | None = 1.25,
    ) -> None:
        """Run `spec` as the application `spec.name` (a new one, or an update of the running one)."""
        await self.connect()
        options = deployment_options(spec, drain_timeout, load_factor)
        argv = serve_argv(spec, data_dir)
        await self._call(self._run, spec.name, options, code_version, argv, spec.token, load_timeout)

    def _run(
        self,
        name: str,
        options: dict[str, Any],
        version: str,
        argv: list[str],
        token: str | None,
        timeout: float,
    ) -> None:
        from ray import serve

        from easllm.control.runtimes.ray_replica import ServiceReplica

        deployment: Any = serve.deployment(serve.ingress()(ServiceReplica), **options)
        try:  # without a version, Serve picks a random one per `serve.run` and restarts every replica;
            # with the same version and other replica counts, it only scales. An internal option.
            deployment = deployment.options(version=version, _internal=True)
        except (TypeError, ValueError):
            log.warning("this Ray Serve takes no deployment version: every update restarts replicas")
        serve._run(  # serve.run without waiting: the console's loop watches serve.status()
            deployment.bind(argv, token, timeout),
            _blocking=False,
            name=name,
            route_prefix=gateway_prefix(name),
        )

    async def delete(self, name: str) -> None:
        """Remove the application and its replicas (after their in-flight requests finish)."""
        await self.connect()
        from ray import serve

        await self._call(serve.delete, name)

    async def statuses(self) -> dict[str, RayAppState]:
        """Every Serve application on the cluster, by name."""
        await self.connect()
        from ray import serve

        status = await self._call(serve.status)
        return {name: _app_state(app) for name, app in status.applications.items()}

    async def replicas(self, name: str) -> list[dict[str, Any]]:
        """The replicas of one application: id, state, node, pid (empty if Serve cannot say)."""
        try:
            from ray.serve.context import _get_global_client

            def read() -> Any:  # on the Ray thread, as every Ray call
                client = _get_global_client()
                if client is None:
                    raise LookupError("Serve is not started")
                return client.get_serve_details()

            details = await self._call(read)
            deployment = details["applications"][name]["deployments"][DEPLOYMENT]
        except Exception:  # private API, or no such application
            return []
        return [
            {
                "id": r.get("replica_id"),
                "status": r.get("state"),
                "node": r.get("node_ip"),
                "pid": r.get("pid"),
                "started": r.get("start_time_s"),
            }
            for r in deployment.get("replicas", [])
        ]


def _app_state(app: Any) -> RayAppState:
    deployment = app.deployments.get(DEPLOYMENT)
    replicas = dict(deployment.replica_states) if deployment is not None else {}
    message = app.message or (deployment.message if deployment is not None else "")
    status = getattr(app.status, "value", str(app.status))
    return RayAppState(
        str(status), message, {str(k): v for k, v in replicas.items()}, app.last_deployed_time_s
    )
