"""What `easllm deploy`, `update` and `start` print while a version comes up, and when it is up.
Model pulls show as progress lines while the console fetches weights before starting replicas.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def wait_for_version(client: Any, name: str, version: int, timeout: float, started: float) -> int:
    """Until `version` serves with all its replicas ready, or it fails, or each of its replicas is
    ready or failed with some failed; crashes and retries are printed as they happen."""
    seen, shown = None, ""
    while time.monotonic() - started < timeout:
        service = client.describe(name)
        pull = service.get("pull")
        if pull and pull["state"] == "pulling" and (line := pull_line(pull))[:60] != shown[:60]:
            print(f"{name}: pulling {line}", flush=True)
            shown = line
        events = service["events"]
        seen = len(events) if seen is None else seen
        for event in events[seen:]:
            if event["kind"] in ("crash", "failed"):
                print(f"  {event['kind']}: {event['message'].splitlines()[0]}", file=sys.stderr, flush=True)
        seen = len(events)
        status = next(v["status"] for v in service["versions"] if v["version"] == version)
        if status == "failed" or service["status"] == "failed":
            print(f"{name}: version {version} failed", file=sys.stderr)
            for event in events[-5:]:
                print(f"  {event['kind']}: {event['message']}", file=sys.stderr)
            return 1
        if status == "active" and service["status"] == "running":
            print(f"{name}: version {version} ready in {time.monotonic() - started:.1f}s")
            print_invocation(service)
            return 0
        mine = [r for r in service["instances"] if r["version"] == version]
        failed = [r for r in mine if r["status"] == "failed"]
        if status == "active" and failed and all(r["status"] in ("ready", "failed") for r in mine):
            ready = service["replicas"]
            print(
                f"{name}: version {version} serves with {ready['ready']} of {ready['wanted']} replicas; "
                f"{len(failed)} failed:",
                file=sys.stderr,
            )
            for r in failed:
                print(f"  replica {r['id']}: {r.get('detail') or 'failed'}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"{name}: not ready after {timeout:.0f}s (see `easllm describe {name}`)", file=sys.stderr)
    return 1


def print_invocation(service: dict[str, Any]) -> None:
    inv = service["invocation"]
    print("Invocation information")
    for label, key in (
        ("endpoint", "endpoint"),
        ("token", "token"),
        ("websocket", "websocket"),
        ("openai base", "openai_base_url"),
        ("web app", "webui"),
    ):
        print(f"  {label:12} {inv[key]}")
    print(f"  {'example':12} {inv['curl']}")


def pull_line(pull: dict[str, Any]) -> str:
    gib = 1 << 30
    return (
        f"{pull['repo_id']} from {pull['source']}: {pull['percent']}% ({pull['done_bytes'] / gib:.2f} of "
        f"{pull['total_bytes'] / gib:.2f} GiB){' ' + pull['error'] if pull['error'] else ''}"
    )
