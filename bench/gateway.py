"""What the console's gateway costs: the same requests sent to a replica directly and through the gateway.

Starts `easllm console` on a free port, deploys one service (fake engine by default, so the numbers
are the proxy's and not the model's), and measures in the same run, same replica:
  - sequential non-streamed requests: latency p50 / p95
  - concurrent non-streamed requests: requests per second
  - streamed requests (NUL-delimited): time to the first chunk, p50

    .venv/bin/python bench/gateway.py [--requests 300] [--concurrency 8] [--rounds 3]
    .venv/bin/python bench/gateway.py --model gemma3-270m --engine llamacpp --requests 30

The two paths alternate for `--rounds` rounds and each cell is the median over rounds, so load from
other processes falls on both alike. Clients keep their connections alive (one session per thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ADMIN = "bench-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(url: str, token: str, n: int, body: dict) -> list[float]:
    session, times = requests.Session(), []
    for _ in range(n):
        start = time.perf_counter()
        r = session.post(url, json=body, headers={"Authorization": token}, timeout=120)
        r.raise_for_status()
        times.append(time.perf_counter() - start)
    return times


def concurrent(url: str, token: str, n: int, workers: int, body: dict) -> float:
    sessions: dict[int, requests.Session] = {}

    def one(_: int) -> None:
        session = sessions.setdefault(threading.get_ident(), requests.Session())
        session.post(url, json=body, headers={"Authorization": token}, timeout=120).raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - start)


def first_chunk(url: str, token: str, n: int, body: dict) -> list[float]:
    session, times = requests.Session(), []
    for _ in range(n):
        start = time.perf_counter()
        r = session.post(
            url, json={**body, "use_stream_chat": True}, headers={"Authorization": token}, stream=True
        )
        next(r.iter_lines(chunk_size=64, delimiter=b"\0"))
        times.append(time.perf_counter() - start)
        r.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="qwen2.5-0.5b-instruct")
    parser.add_argument("--engine", default="fake")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the console

    state = Path(tempfile.mkdtemp(prefix="easllm-bench-gateway-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "easllm.cli", "console", "--port", str(port), "--state-dir", str(state),
           "--admin-token", ADMIN, "--log-level", "WARNING"]  # fmt: skip
    console = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=(state / "console.log").open("wb"), env=env
    )
    base = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        for _ in range(300):
            try:
                if requests.get(f"{base}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        serve_args = ["--api-only", "--log-level", "WARNING", "--max-new-tokens", str(args.max_new_tokens)]
        spec = {"name": "bench", "model": args.model, "engine": args.engine, "args": serve_args}
        r = requests.post(f"{base}/api/services", json=spec, headers=admin, timeout=120)
        r.raise_for_status()
        started = time.perf_counter()
        while (service := requests.get(f"{base}/api/services/bench", headers=admin).json())[
            "status"
        ] != "running":
            if service["status"] == "failed" or time.perf_counter() - started > 600:
                raise SystemExit(json.dumps(service["events"], indent=1))
            time.sleep(0.2)
        print(f"deploy-to-ready: {time.perf_counter() - started:.1f}s ({args.model} on {args.engine})")
        token = service["token"]
        direct = f"http://127.0.0.1:{service['instances'][0]['port']}/"
        gateway = service["invocation"]["endpoint"]
        body = {"prompt": "Hello there", "temperature": 0}
        sequential(direct, token, 20, body)  # warm up both paths
        sequential(gateway, token, 20, body)

        cells: dict[str, list[tuple[float, float, float, float]]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            for label, url in (("direct", direct), ("gateway", gateway)):
                lat = sequential(url, token, args.requests, body)
                rps = concurrent(url, token, args.requests, args.concurrency, body)
                ttfc = first_chunk(url, token, max(20, args.requests // 5), body)
                cells[label].append(
                    (statistics.median(lat), percentile(lat, 0.95), rps, statistics.median(ttfc))
                )
        rows = {
            label: [statistics.median(c[i] for c in runs) for i in range(4)] for label, runs in cells.items()
        }
        header = f"req/s @{args.concurrency}"
        print(f"\n{'path':10} {'p50 ms':>9} {'p95 ms':>9} {header:>12} {'TTFC p50 ms':>12}")
        for label, (p50, p95, rps, ttfc) in rows.items():
            print(f"{label:10} {p50 * 1e3:9.2f} {p95 * 1e3:9.2f} {rps:12.1f} {ttfc * 1e3:12.2f}")
        d, g = rows["direct"], rows["gateway"]
        print(
            f"\ngateway: +{(g[0] - d[0]) * 1e3:.2f} ms p50 a request, throughput x{g[2] / d[2]:.2f} of direct"
        )
    finally:
        requests.delete(f"{base}/api/services/bench", headers=admin, timeout=60)
        console.send_signal(signal.SIGTERM)
        console.wait(timeout=60)
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
