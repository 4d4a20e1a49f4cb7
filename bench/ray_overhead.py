"""What Ray Serve costs and gives: requests/s and latency of one `easllm serve` process vs the same
app behind Serve's proxy with 1 and 2 replicas, and the time from `serve.run` to ready.

All in one run, same client load, the fake engine (so the numbers are serving overhead, not a
model): C client threads each send EAS text requests back to back for --seconds. The Serve app
is deployed with the console's own RayCluster on a private one-node cluster (`local`).
Some Ray processes listen on every interface: run it inside a private network namespace,

    unshare -rn sh -c 'ip link set lo up && exec .venv/bin/python bench/ray_overhead.py'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.control.runtimes.ray import code_version
from easllm.control.runtimes.ray_cluster import RayCluster
from easllm.control.spec import parse_spec
from tests.servers import free_port, running_server

TOKEN = "bench-token-123"


def load(url: str, clients: int, seconds: float, tokens: int) -> tuple[float, float, float]:
    """(requests/s, median ms, p90 ms) of `clients` threads posting back to back."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                started = time.perf_counter()
                r = session.post(url, json={"prompt": "bench", "max_new_tokens": tokens},
                                 headers={"Authorization": TOKEN}, timeout=60)  # fmt: skip
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:100]}")
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    latencies.sort()
    return (
        len(latencies) / took,
        statistics.median(latencies) * 1e3,
        latencies[int(len(latencies) * 0.9)] * 1e3,
    )


async def serve_rows(args: argparse.Namespace, tmp: Path) -> list[tuple[str, tuple[float, float, float]]]:
    cluster = RayCluster("local", free_port())
    rows = []
    try:
        started = time.monotonic()
        proxy = await cluster.connect()
        print(f"private Ray cluster + Serve up in {time.monotonic() - started:.1f}s", flush=True)
        for replicas in (1, 2):
            spec = parse_spec({
                "name": "bench", "engine": "fake", "runtime": "ray", "replicas": replicas, "token": TOKEN,
                "args": ["--api-only", "--max-new-tokens", str(args.tokens)],
            })  # fmt: skip
            started = time.monotonic()
            await cluster.deploy(spec, code_version(spec), tmp, 120, 5)
            while (state := (await cluster.statuses()).get("bench")) is None or state.status != "RUNNING":
                await asyncio.sleep(0.2)
            print(
                f"{replicas} replica(s): serve.run -> RUNNING in {time.monotonic() - started:.1f}s",
                flush=True,
            )
            url = f"{proxy}/api/predict/bench/"
            load(url, args.clients, 2, args.tokens)  # warm up
            rows.append(
                (f"Ray Serve, {replicas} replica(s)", load(url, args.clients, args.seconds, args.tokens))
            )
        await cluster.delete("bench")
    finally:
        await cluster.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=64, help="answer length (fake engine tokens)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default, with a token of this run only
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    with tempfile.TemporaryDirectory() as tmp:
        serve_args = ["--engine", "fake", "--api-only", "--max-new-tokens", str(args.tokens)]
        with running_server(serve_args, Path(tmp), token=TOKEN) as server:
            load(server.url + "/", args.clients, 2, args.tokens)
            rows = [
                (
                    "easllm serve (one process)",
                    load(server.url + "/", args.clients, args.seconds, args.tokens),
                )
            ]
        rows += asyncio.run(serve_rows(args, Path(tmp)))
    base = rows[0][1][0]
    print(f"\n{args.clients} clients, {args.seconds:.0f}s each, {args.tokens}-token answers, fake engine")
    print(f"{'':32} {'req/s':>8} {'median ms':>10} {'p90 ms':>8} {'vs direct':>10}")
    for label, (rps, median, p90) in rows:
        print(f"{label:32} {rps:8.1f} {median:10.1f} {p90:8.1f} {rps / base:9.2f}x")


if __name__ == "__main__":
    main()
