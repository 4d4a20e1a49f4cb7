"""`easllm console`, and the verbs that talk to it: deploy list describe update stop start delete logs."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easllm.config import easllm_home
from easllm.control.progress import print_invocation, pull_line, wait_for_version
from easllm.logs import LOG_LEVELS
from easllm.serve_flags import add_allowed_hosts

if TYPE_CHECKING:
    from easllm.control.config import ConsoleConfig

COMMANDS = ("console", "deploy", "list", "describe", "update", "stop", "start", "delete", "logs")


def add_console_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    console = sub.add_parser("console", help="run the console: registry, replicas, gateway and REST API")
    console.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    console.add_argument("--port", type=int, default=8080, help="gateway and API port (default %(default)s)")
    console.add_argument(
        "--db",
        default=None,
        help="database URL (default: SQLite at STATE_DIR/console.db); "
        "e.g. postgresql+psycopg://user:pw@host/db",
    )
    console.add_argument(
        "--admin-token",
        default=os.environ.get("EASLLM_ADMIN_TOKEN"),
        help="token of the REST API (default: $EASLLM_ADMIN_TOKEN, else generated into STATE_DIR)",
    )
    console.add_argument(
        "--state-dir", type=Path, default=None, help="database, logs, service data (default: $EASLLM_HOME)"
    )
    console.add_argument(
        "--public-url", default=None, help="how clients reach this port (shown as endpoints)"
    )
    add_allowed_hosts(console, "console", also=" and --public-url's")
    console.add_argument(
        "--keep-replicas",
        action="store_true",
        help="leave replicas running when the console exits; the next console reattaches",
    )
    console.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds to finish requests (%(default)s)"
    )
    console.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds for a replica to get ready"
    )
    console.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    console.add_argument(
        "--max-failed-starts",
        type=int,
        default=5,
        help="failed starts in a row (retried with back-off) before a replica is marked failed (%(default)s)",
    )
    console.add_argument(
        "--routing",
        choices=("prefix", "least-loaded"),
        default="prefix",
        help="how the gateway picks a replica: prefix keeps a conversation on one replica (its "
        "prefix cache) within a load bound; least-loaded: fewest requests in flight (%(default)s)",
    )
    console.add_argument(
        "--routing-load-factor",
        type=float,
        default=1.25,
        help="prefix routing: no replica takes more than this x the average load (>= 1; %(default)s)",
    )
    console.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    console.add_argument(
        "--ray-address",
        default=os.environ.get("EASLLM_RAY_ADDRESS"),
        help='Ray cluster for services with "runtime": "ray" (HOST:PORT of `ray start --head`, auto, '
        "or local for a private one-machine cluster; default: $EASLLM_RAY_ADDRESS)",
    )
    console.add_argument(
        "--ray-serve-port", type=int, default=8000, help="port of Ray Serve's HTTP proxy (%(default)s)"
    )

    deploy = sub.add_parser("deploy", help="deploy a named service (from flags or a JSON spec)")
    _client_flags(deploy)
    deploy.add_argument("spec_file", nargs="?", type=Path, help="service spec JSON file")
    deploy.add_argument("--spec", dest="spec_flag", type=Path, help="service spec JSON file")
    deploy.add_argument("--name", help="service name: letters, digits and _ (e.g. llm_demo001)")
    _spec_flags(deploy)
    deploy.add_argument("--dry-run", action="store_true", help="only show the recommended resources")
    _wait_flags(deploy)

    sub.add_parser("list", help="list services").add_argument("--json", action="store_true")
    _client_flags(sub.choices["list"])
    describe = sub.add_parser("describe", help="a service: endpoint, token, replicas, versions, events")
    _client_flags(describe)
    describe.add_argument("name")
    describe.add_argument("--json", action="store_true")

    update = sub.add_parser(
        "update", help="change model, engine, replicas ... (a new version, no failed requests)"
    )
    _client_flags(update)
    update.add_argument("name")
    _spec_flags(update)
    update.add_argument("--new-token", action="store_true", help="generate a new service token")
    _wait_flags(update)

    for verb, text in (
        ("stop", "stop a service"),
        ("start", "start a stopped service"),
        ("delete", "delete a service"),
    ):
        p = sub.add_parser(verb, help=text)
        _client_flags(p)
        p.add_argument("name")
        if verb == "start":
            _wait_flags(p)

    logs = sub.add_parser("logs", help="the logs of a service's replicas")
    _client_flags(logs)
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, default=100, help="lines per replica to start with (%(default)s)")
    logs.add_argument("--replica", type=int, default=None, help="only this replica's log")


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--console",
        default=os.environ.get("EASLLM_CONSOLE", "http://127.0.0.1:8080"),
        help="console URL (default: $EASLLM_CONSOLE or %(default)s)",
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="admin token (default: $EASLLM_ADMIN_TOKEN or the token file of a console on this machine)",
    )


def _spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="bundled name, catalog name, HF directory or .gguf file")
    p.add_argument("--engine", choices=("transformers", "llamacpp", "vllm", "fake"))
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--replicas", type=int)
    p.add_argument("--cpus", type=int, help="CPU cores per replica (also its threads)")
    p.add_argument("--memory", type=int, help="memory per replica in MiB")
    p.add_argument("--gpus", type=int, help="GPUs per replica (0: CPU)")
    p.add_argument("--token", help="service token (default on deploy: generated)")
    p.add_argument(
        "--serve-args",
        help='extra `easllm serve` flags, e.g. "--max-new-tokens 512" (one flag: --serve-args=--api-only)',
    )
    p.add_argument("--runtime", choices=("local", "ray"), help="local processes, or Ray Serve")
    p.add_argument("--ray-address", help="runtime ray: the cluster (default: the console's --ray-address)")
    p.add_argument("--min-replicas", type=int, help="runtime ray: autoscale down to this many")
    p.add_argument("--max-replicas", type=int, help="runtime ray: autoscale up to this many")
    p.add_argument("--target-ongoing-requests", type=float, help="runtime ray: requests per replica")


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="return at once instead of waiting until ready")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (%(default)s)")


def _spec_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for key in ("model", "engine", "precision", "replicas", "token"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    resources = {
        k: v for k, v in (("cpu", args.cpus), ("memory", args.memory), ("gpu", args.gpus)) if v is not None
    }
    if resources:
        spec["resources"] = resources
    if args.serve_args is not None:
        spec["args"] = shlex.split(args.serve_args)
    if args.runtime is not None:
        spec["runtime"] = args.runtime
    if args.ray_address is not None:
        spec["ray_address"] = args.ray_address
    scaling = {
        k: v
        for k, v in (
            ("min_replicas", args.min_replicas),
            ("max_replicas", args.max_replicas),
            ("target_ongoing_requests", args.target_ongoing_requests),
        )
        if v is not None
    }
    if scaling:
        spec["autoscaling"] = scaling
    return spec


def run(args: argparse.Namespace) -> int:
    if args.command == "console":
        return _console(args)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    from easllm.control.client import ConsoleClient, ConsoleError, default_admin_token

    token = args.admin_token or default_admin_token()
    try:
        with ConsoleClient(args.console, token) as client:
            return VERBS[args.command](client, args)
    except ConsoleError as exc:
        where = f" ({exc.param})" if exc.param else ""
        print(f"error{where}: {exc.message}", file=sys.stderr)
        return 2 if exc.status in (400, 401, 404, 409) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `easllm logs -f | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _console(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from easllm.control.app import create_console_app

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    if not 1.0 <= args.routing_load_factor <= 100.0:
        print("error (--routing-load-factor): must be between 1 and 100", file=sys.stderr)
        return 2
    if not 1 <= args.max_failed_starts <= 1000:
        print("error (--max-failed-starts): must be between 1 and 1000", file=sys.stderr)
        return 2
    config = console_config(args)
    if not args.admin_token:
        print(f"easllm console: admin token in {config.state_dir / 'console-admin-token'}", flush=True)
    uvicorn.run(
        create_console_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    return 0


def console_config(args: argparse.Namespace) -> ConsoleConfig:
    """Parsed `easllm console` flags -> its config (the admin token generated when not given)."""
    from easllm.control.config import ConsoleConfig, load_or_create_admin_token

    state_dir: Path = args.state_dir or easllm_home()
    admin = args.admin_token or load_or_create_admin_token(state_dir)
    return ConsoleConfig(
        state_dir=state_dir,
        host=args.host,
        port=args.port,
        db_url=args.db,
        admin_token=admin,
        public_url=args.public_url,
        allowed_hosts=tuple(args.allowed_hosts),
        keep_replicas=args.keep_replicas,
        health_interval=args.health_interval,
        max_failed_starts=args.max_failed_starts,
        routing=args.routing,
        routing_load_factor=args.routing_load_factor,
        startup_timeout=args.startup_timeout,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
        ray_address=args.ray_address,
        ray_serve_port=args.ray_serve_port,
    )


def _deploy(client: Any, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {}
    path = args.spec_flag or args.spec_file
    if path is not None:
        try:
            spec = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the spec {path}: {exc}", file=sys.stderr)
            return 2
    spec.update(_spec_from_flags(args))
    if args.name:
        spec["name"] = args.name
    if args.dry_run:
        print(client.deploy(spec, dry_run=True)["summary"])
        return 0
    started = time.monotonic()
    service = client.deploy(spec)
    print(f"deploying {service['name']} (version 1) ...", flush=True)
    if args.no_wait:
        print_invocation(service)
        return 0
    return wait_for_version(client, service["name"], 1, args.timeout, started)


def _update(client: Any, args: argparse.Namespace) -> int:
    changes = _spec_from_flags(args)
    if args.new_token:
        changes["token"] = _new_token()
    started = time.monotonic()
    result = client.update(args.name, changes)
    version = result["rollout"]["version"]
    print(f"updating {args.name} to version {version} ...", flush=True)
    return 0 if args.no_wait else wait_for_version(client, args.name, version, args.timeout, started)


def _new_token() -> str:
    import secrets

    return secrets.token_urlsafe(24)


def _list(client: Any, args: argparse.Namespace) -> int:
    services = client.list()
    if args.json:
        print(json.dumps(services, indent=2))
        return 0
    if not services:
        print("no services (deploy one with `easllm deploy --name NAME --model MODEL`)")
        return 0
    print(f"{'NAME':20} {'STATUS':10} {'VERSION':>7} {'READY':>6}  {'MODEL':28} ENDPOINT")
    for s in services:
        ready = f"{s['replicas']['ready']}/{s['replicas']['wanted']}"
        model = s["model"][:28]
        print(f"{s['name']:20} {s['status']:10} {s['version']:>7} {ready:>6}  {model:28} {s['endpoint']}")
    return 0


def _describe(client: Any, args: argparse.Namespace) -> int:
    s = client.describe(args.name)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"Service {s['name']}: {s['status']} (version {s['version']}, wanted {s['desired']})")
    print(f"  model        {s['model']} (engine {s['spec']['engine'] or 'by model'})")
    print(f"  replicas     {s['replicas']['wanted']} wanted, {s['replicas']['ready']} ready")
    print_invocation(s)
    print("Replicas")
    for r in s["instances"]:
        print(
            f"  #{r['id']:<4} v{r['version']:<3} {r['status']:10} port {r['port']:<6} pid {r['pid']} "
            f"restarts {r['restarts']}"
        )
    print("Versions")
    for v in s["versions"]:
        print(
            f"  v{v['version']:<3} {v['status']:11} {v['model']} ({v['engine'] or 'auto'}), {v['replicas']} "
            f"replica(s), {v['created_at'][:19]}"
        )
    if s.get("pull"):
        print(f"Model pull\n  {s['pull']['state']:10} {pull_line(s['pull'])}")
    print("Events")
    for e in s["events"][-10:]:
        print(f"  {e['at'][:19]} {e['kind']:9} {e['message'].splitlines()[0] if e['message'] else ''}")
    return 0


def _stop(client: Any, args: argparse.Namespace) -> int:
    client.stop(args.name)
    print(f"{args.name}: stopped")
    return 0


def _start(client: Any, args: argparse.Namespace) -> int:
    started = time.monotonic()
    service = client.start(args.name)
    print(f"starting {args.name} ...", flush=True)
    return (
        0 if args.no_wait else wait_for_version(client, args.name, service["version"], args.timeout, started)
    )


def _delete(client: Any, args: argparse.Namespace) -> int:
    client.delete(args.name)
    print(f"{args.name}: deleted")
    return 0


def _logs(client: Any, args: argparse.Namespace) -> int:
    for chunk in client.logs(args.name, args.tail, args.follow, args.replica):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    return 0


VERBS = {
    "deploy": _deploy,
    "list": _list,
    "describe": _describe,
    "update": _update,
    "stop": _stop,
    "start": _start,
    "delete": _delete,
    "logs": _logs,
}
