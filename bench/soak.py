"""Soak: many concurrent clients on every API for a while, a quarter of them hanging up mid-answer;
then check that nothing leaked. One command, bounded in time, loopback only:

    .venv/bin/python bench/soak.py                      # gemma3-270m on llama.cpp (continuous batching)
    .venv/bin/python bench/soak.py --engine fake        # the server alone, no model
    .venv/bin/python bench/soak.py --clients 64 --duration 60 --runs 3

Starts `easllm serve` on a free loopback port. Each client loops over one kind of request (EAS
HTTP, EAS NUL-delimited streaming, WebSocket, OpenAI SSE completions; the kinds are spread evenly
over the clients); every fourth client disconnects each request at a random point (before the
answer, after a few chunks, mid-stream). A 503 is backed off by its Retry-After and retried.
After a short warm-up run, `--runs` runs of `--duration` seconds each; after every run it waits
for the engine to go idle and records the server's RSS, open file descriptors and KV cells in use.

It prints, per run, requests/s, tokens/s (completion tokens of answered requests) and latency
p50/p95 per kind, and checks:
  - no error but 503 with Retry-After (the queue limit),
  - running and waiting sequences back to 0, no KV cells in use, no request in progress,
  - file descriptors back to where they were, RSS within 10% across the runs.
Exit status 1 if a check fails. The machine's load skews the speed figures, not the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import Server, running_server

TOKEN = "soak-token"
GRACE = 30.0  # seconds after a run's end for answers already under way
KINDS = ("eas", "eas_stream", "websocket", "sse")
PROMPTS = [
    "The history of the printing press began",
    "Once upon a time, in a city under the sea,",
    "The three most important rules of cooking are",
    "A lighthouse keeper wrote in his diary:",
    "Bees make honey by",
    "The last library on Earth was",
]


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    tokens: int = 0
    ok: int = 0
    busy: int = 0  # 503 with Retry-After: the queue limit, expected under this load
    cut: int = 0  # requests this side hung up on on purpose
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.errors) < 1000:
            self.errors.append(what)


class Busy(Exception):
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after


def check_busy(status: int, headers: httpx.Headers) -> None:
    if status == 503 and "retry-after" in headers:
        raise Busy(float(headers["retry-after"]))
    if status != 200:
        raise RuntimeError(f"HTTP {status}")


def body(kind: str, tokens: int) -> dict:
    prompt = random.choice(PROMPTS)
    if kind == "sse":
        return {
            "prompt": prompt,
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    return {"prompt": prompt, "max_new_tokens": tokens, "use_stream_chat": kind != "eas", "history": []}


async def eas(http: httpx.AsyncClient, url: str, tokens: int, cut: int | None) -> int:
    request = http.post(url, json=body("eas", tokens))
    if cut is None:
        r = await request
    else:  # hang up before the answer comes: the request is cancelled mid-flight
        try:
            r = await asyncio.wait_for(request, timeout=random.uniform(0.01, 0.5))
        except TimeoutError:
            return -1
    check_busy(r.status_code, r.headers)
    return int(r.json()["usage"]["completion_tokens"])


async def eas_stream(http: httpx.AsyncClient, url: str, tokens: int, cut: int | None) -> int:
    async with http.stream("POST", url, json=body("eas_stream", tokens)) as r:
        check_busy(r.status_code, r.headers)
        buffer, chunks, last = b"", 0, {}
        async for data in r.aiter_raw():
            buffer += data
            *done, buffer = buffer.split(b"\0")
            for chunk in done:
                last = json.loads(chunk)
                chunks += 1
                if cut is not None and chunks > cut:
                    return -1  # leaving the block closes the connection mid-stream
    return int(last["usage"]["completion_tokens"])


async def sse(http: httpx.AsyncClient, base: str, tokens: int, cut: int | None) -> int:
    async with http.stream("POST", f"{base}/v1/completions", json=body("sse", tokens)) as r:
        check_busy(r.status_code, r.headers)
        chunks, used = 0, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            chunks += 1
            if cut is not None and chunks > cut:
                return -1
            if event.get("usage"):
                used = int(event["usage"]["completion_tokens"])
    return used


async def websocket_round(ws_url: str, tokens: int, cut: int | None) -> int:
    async with connect(ws_url, additional_headers={"Authorization": TOKEN}, max_size=None) as ws:
        await ws.send(json.dumps(body("websocket", tokens)))
        chunks, last = 0, {}
        while (text := await ws.recv()) != "<EOS>":
            last = json.loads(text)
            if "error" in last:
                status = last["error"].get("code")
                if status == 503:
                    raise Busy(1.0)
                raise RuntimeError(f"websocket error {status}: {last['error'].get('message')}")
            chunks += 1
            if cut is not None and chunks > cut:
                ws.transport.abort()  # vanish without a close frame, as a dropped network would
                return -1
    return int(last["usage"]["completion_tokens"])


async def client(n: int, server: Server, until: float, tokens: int, tally: Tally) -> None:
    kind = KINDS[n % len(KINDS)]
    hangs_up = (n // len(KINDS)) % 4 == 0  # a quarter of the clients, as many of each kind
    ws_url = server.url.replace("http://", "ws://") + "/"
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(headers={"Authorization": TOKEN}, limits=limits, timeout=120) as http:
        while time.monotonic() < until:
            cut = random.randint(0, 6) if hangs_up else None
            started = time.monotonic()
            try:
                if kind == "eas":
                    used = await eas(http, f"{server.url}/", tokens, cut)
                elif kind == "eas_stream":
                    used = await eas_stream(http, f"{server.url}/", tokens, cut)
                elif kind == "sse":
                    used = await sse(http, server.url, tokens, cut)
                else:
                    used = await websocket_round(ws_url, tokens, cut)
            except Busy as busy:
                tally.busy += 1
                await asyncio.sleep(busy.retry_after * random.uniform(0.5, 1.5))
                continue
            except (httpx.HTTPError, WebSocketException, OSError, RuntimeError, KeyError, ValueError) as exc:
                tally.error(f"{kind}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
                continue
            if used < 0:
                tally.cut += 1
                continue
            tally.ok += 1
            tally.tokens += used
            tally.latencies[kind].append(time.monotonic() - started)


def server_state(server: Server) -> dict:
    health = httpx.get(f"{server.url}/health", timeout=10).json()["engine"]
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": TOKEN}, timeout=10).text
    in_progress = re.search(r"^easllm_http_requests_in_progress (\S+)$", metrics, re.M)
    pid = server.process.pid
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    return {
        "running": health["running"],
        "waiting": health["waiting"],
        "kv_cells_used": health.get("details", {}).get("kv_cells_used"),
        "in_progress": float(in_progress[1]) - 1 if in_progress else None,  # minus this scrape
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_mb": rss_kb / 1024,
    }


def settle(server: Server, timeout: float = 120) -> dict:
    """The server's state once the engine is idle (aborted sequences are freed at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        state = server_state(server)
        idle = not state["running"] and not state["waiting"] and not state["kv_cells_used"]
        if (idle and not state["in_progress"]) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


async def soak(server: Server, clients: int, duration: float, tokens: int) -> tuple[Tally, float]:
    """Clients start no request after `duration`; those still waiting for an answer `GRACE`
    seconds later hang up too (counted as cut), so a run is bounded whatever the load."""
    tally = Tally()
    started = time.monotonic()
    until = started + duration
    tasks = [asyncio.create_task(client(n, server, until, tokens, tally)) for n in range(clients)]
    _, late = await asyncio.wait(tasks, timeout=duration + GRACE)
    for task in late:
        task.cancel()
        tally.cut += 1
    await asyncio.gather(*late, return_exceptions=True)
    return tally, min(time.monotonic() - started, duration + GRACE)


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("llamacpp", "fake"), default="llamacpp")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of an unmeasured first run")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per request")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=32, help="small, so the queue limit is reached")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    serve = ["--api-only", "--max-new-tokens", str(args.tokens), "--max-queue", str(args.max_queue)]
    serve += ["--log-level", "WARNING", "--max-batch", str(args.max_batch)]
    if args.engine == "fake":
        serve += ["--engine", "fake"]
    else:
        serve += ["--model-path", args.model, "--engine", "llamacpp", "--cpu"]
    if args.threads:
        serve += ["--threads", str(args.threads)]
    # llama.cpp's OpenMP threads sleep at barriers instead of spinning: far faster on a shared machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load = os.getloadavg()
    print(
        f"soak: {args.engine} {'' if args.engine == 'fake' else args.model}, {args.clients} clients, "
        f"{args.runs} x {args.duration:g} s, load average {load[0]:.1f} on {os.cpu_count()} CPUs"
    )
    with (
        tempfile.TemporaryDirectory(prefix="easllm-soak-") as tmp,
        running_server([*serve, "--data-dir", f"{tmp}/data"], Path(tmp), token=TOKEN, timeout=600) as server,
    ):
        baseline = settle(server)
        if args.warmup > 0:
            asyncio.run(soak(server, args.clients, args.warmup, args.tokens))
            settle(server)
        rows, failures = [], []
        print_header(baseline)
        for run in range(1, args.runs + 1):
            tally, wall = asyncio.run(soak(server, args.clients, args.duration, args.tokens))
            state = settle(server)
            rows.append((run, tally, wall, state))
            print_row(run, tally, wall, state)
            if tally.errors:
                failures.append(f"run {run}: {len(tally.errors)} errors, e.g. {tally.errors[:3]}")
            leaks = {k: state[k] for k in ("running", "waiting", "kv_cells_used", "in_progress") if state[k]}
            if leaks:
                failures.append(f"run {run}: not back to idle: {leaks}")
            if state["fds"] > baseline["fds"] + 8:
                failures.append(f"run {run}: {state['fds']} open files, {baseline['fds']} before")
        log = server.log()
    rss = [state["rss_mb"] for *_, state in rows]
    growth = max(rss) / min(rss) - 1
    print(f"RSS across runs: {', '.join(f'{r:.0f}' for r in rss)} MB (spread {growth:.1%}, limit 10%)")
    if growth > 0.10:
        failures.append(f"RSS not flat: {rss}")
    if "Traceback" in log:
        kept = Path(tempfile.gettempdir()) / "easllm-soak-server.log"
        kept.write_text(log)
        failures.append(f"the server logged {log.count('Traceback')} traceback(s): see {kept}")
    for f in failures:
        print(f"FAIL {f}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def print_header(baseline: dict) -> None:
    head = f"{'run':>3} {'ok':>6} {'503':>5} {'cut':>5} {'err':>4} {'req/s':>7} {'tok/s':>7} "
    head += " ".join(f"{k + ' p50/p95 s':>22}" for k in KINDS) + f" {'RSS MB':>7} {'fds':>4} {'kv':>3}"
    print(head, flush=True)
    print(
        f"{'-':>3} {'':>6} {'':>5} {'':>5} {'':>4} {'':>7} {'':>7} "
        + " " * 91
        + f" {baseline['rss_mb']:>7.0f} {baseline['fds']:>4} {baseline['kv_cells_used'] or 0:>3}  (before)",
        flush=True,
    )


def print_row(run: int, t: Tally, wall: float, s: dict) -> None:
    cells = " ".join(f"{p(t.latencies[k], 50):>10.2f} / {p(t.latencies[k], 95):>8.2f}" for k in KINDS)
    print(
        f"{run:>3} {t.ok:>6} {t.busy:>5} {t.cut:>5} {len(t.errors):>4} {t.ok / wall:>7.1f} "
        f"{t.tokens / wall:>7.1f} {cells} {s['rss_mb']:>7.0f} {s['fds']:>4} {s['kv_cells_used'] or 0:>3}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
