"""Latency under attack: a normal 32-token request measured beside each hostile client (issue 16).

    .venv/bin/python bench/hostile.py                        # gemma3-270m on llama.cpp
    .venv/bin/python bench/hostile.py --engine fake          # the server alone, no model
    .venv/bin/python bench/hostile.py --samples 3 --attackers 1 --only deep_json,slow_post   # smoke
    .venv/bin/python bench/hostile.py --pin                  # the attackers on one core of their own
    .venv/bin/python bench/hostile.py --abuse-rate 0         # without the abuse throttle, to compare

Starts `easllm serve` on a free loopback port (with a token, so wrong tokens can be tried). First
the normal request alone (`--samples` times, the median is the baseline), then for each attack:
`--attackers` hostile clients loop on it while the normal request is measured again. The hostile
clients connect from 127.0.0.2 (the normal one from 127.0.0.1), so the server's per-client limits
see two clients, and run in their own process; `--pin` pins that process to one core (the last),
as an attacker on another machine would take none of the server's. Attacks that
also generate text (a stream with the largest history allowed, the most stop strings allowed) are
measured beside a benign twin too (the same generation without the hostile part), since any
second generation shares the CPU: `vs twin` is the hostile part's own cost.

Prints per attack: hostile requests sent, their status codes, 5xx seen (hostile and normal), the
normal request's median latency, and its ratio to the baseline (and to the twin). Target: ratio
<= 1.5 and no 5xx. Exit status 1 if a 5xx was seen or a normal request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.protocol.eas import MAX_HISTORY_CHARS, MAX_HISTORY_ROUNDS
from easllm.protocol.validation import MAX_STOP_CHARS, MAX_STOP_STRINGS
from tests.servers import Server, running_server

TOKEN = "hostile-bench-token"
ATTACKER_ADDRESS = "127.0.0.2"  # another client than the normal one (127.0.0.1), on the loopback
AUTH = {"Authorization": TOKEN}
PROMPT = "The three most important rules of cooking are"


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def add(self, status: int) -> None:
        self.sent += 1
        self.statuses[status] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


Attack = Callable[[httpx.AsyncClient, Server, Tally, int], Awaitable[None]]


def largest_history() -> list[list[str]]:
    per_round = MAX_HISTORY_CHARS // MAX_HISTORY_ROUNDS // 2 - 1
    return [["q" * per_round, "a" * per_round]] * MAX_HISTORY_ROUNDS


async def stream(client: httpx.AsyncClient, server: Server, tally: Tally, body: dict) -> None:
    async with client.stream("POST", f"{server.url}/", json=body, headers=AUTH) as r:
        async for _ in r.aiter_raw():
            pass
        tally.add(r.status_code)


async def history_stream(client: httpx.AsyncClient, server: Server, tally: Tally, tokens: int) -> None:
    body = {"prompt": PROMPT, "history": HISTORY, "use_stream_chat": True, "max_new_tokens": tokens}
    await stream(client, server, tally, body)


async def plain_stream(client: httpx.AsyncClient, server: Server, tally: Tally, tokens: int) -> None:
    await stream(client, server, tally, {"prompt": PROMPT, "use_stream_chat": True, "max_new_tokens": tokens})


async def many_stops(client: httpx.AsyncClient, server: Server, tally: Tally, tokens: int) -> None:
    stops = [f"{i:03d}" + "z" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    body = {"prompt": PROMPT, "stop": stops, "use_stream_chat": True, "max_new_tokens": tokens}
    await stream(client, server, tally, body)


async def post(
    client: httpx.AsyncClient, server: Server, tally: Tally, content: bytes, path: str = "/"
) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    r = await client.post(f"{server.url}{path}", content=content, headers=headers)
    tally.add(r.status_code)


async def history_over_limit(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    await post(client, server, tally, OVER_LIMIT)  # 200,000 rounds, 3.4 MB: the probe


async def deep_json(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    await post(client, server, tally, DEEP)


async def deep_json_openai(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    await post(client, server, tally, DEEP_CHAT, "/v1/chat/completions")


async def too_many_stops(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    await post(client, server, tally, json.dumps({"prompt": PROMPT, "stop": ["s"] * 100_000}).encode())


async def huge_keys(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    await post(client, server, tally, HUGE_KEYS)  # 15 MB of unknown field names (logged once, escaped)


async def wrong_tokens(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    r = await client.post(f"{server.url}/", content=b"hi", headers={"Authorization": "guess"})
    tally.add(r.status_code)
    if r.status_code == 429:
        await asyncio.sleep(0.05)


async def slow_post(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    """A body that trickles in a byte a second: the server cuts it off (408) after --body-timeout."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(ATTACKER_ADDRESS, 0))
    head = f"POST / HTTP/1.1\r\nHost: {host}\r\nAuthorization: {TOKEN}\r\nContent-Type: application/json\r\n"
    writer.write((head + "Content-Length: 100000\r\n\r\n").encode())
    try:
        while not reader.at_eof():
            writer.write(b" ")
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
            except TimeoutError:
                continue
            if line.startswith(b"HTTP/1.1"):
                tally.add(int(line.split()[1]))
                break
    except (ConnectionError, OSError):
        tally.add(499)
    finally:
        writer.close()


async def websocket_flood(client: httpx.AsyncClient, server: Server, tally: Tally, _: int) -> None:
    """Messages sent far ahead of their answers: the server closes the connection (1008)."""
    url = server.url.replace("http", "ws", 1) + "/"
    try:
        async with connect(
            url, additional_headers=AUTH, max_size=None, local_addr=(ATTACKER_ADDRESS, 0)
        ) as ws:
            for _ in range(200):
                await ws.send("x" * 100_000)
            async for _ in ws:
                pass
    except WebSocketException:
        pass
    tally.add(101)


ATTACKS: dict[str, tuple[Attack, Attack | None]] = {
    "history_stream": (history_stream, plain_stream),
    "history_over_limit": (history_over_limit, None),
    "deep_json": (deep_json, None),
    "deep_json_openai": (deep_json_openai, None),
    "many_stops": (many_stops, plain_stream),
    "too_many_stops": (too_many_stops, None),
    "huge_keys": (huge_keys, None),
    "wrong_tokens": (wrong_tokens, None),
    "slow_post": (slow_post, None),
    "websocket_flood": (websocket_flood, None),
}
TWINS: dict[str, Attack] = {"plain_stream": plain_stream}
TWIN_OF = {name: "plain_stream" for name, (_, twin) in ATTACKS.items() if twin is not None}
HISTORY = largest_history()
OVER_LIMIT = json.dumps(
    {"prompt": PROMPT, "history": [["a", "b"]] * 200_000, "use_stream_chat": True}
).encode()
DEEP = ('{"prompt": "hi", "history": ' + "[" * 50_000 + "]" * 50_000 + "}").encode()
DEEP_CHAT = (
    '{"messages": [{"role": "user", "content": "hi"}], "stop": ' + "[" * 50_000 + "]" * 50_000 + "}"
).encode()
HUGE_KEYS = json.dumps({"prompt": PROMPT, **{f"k{i}" + "x" * 15_000: 1 for i in range(1000)}}).encode()


async def normal(client: httpx.AsyncClient, server: Server, tokens: int, tally: Tally) -> float:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    r = await client.post(f"{server.url}/", json=body, headers=AUTH)
    tally.add(r.status_code)
    if r.status_code != 200:
        raise RuntimeError(f"the normal request got {r.status_code}: {r.text[:200]}")
    return time.perf_counter() - started


async def attack_loops(name: str, url: str, attackers: int, tokens: int, stop: Any, ready: Any) -> Tally:
    """`attackers` clients looping on attack `name` until `stop` (a multiprocessing Event) is set."""
    attack = ATTACKS[name][0] if name in ATTACKS else TWINS[name]
    server = Server(url, TOKEN, None, Path(os.devnull))  # type: ignore[arg-type]
    hostile = Tally()
    limits = httpx.Limits(max_connections=attackers + 4)
    transport = httpx.AsyncHTTPTransport(local_address=ATTACKER_ADDRESS, limits=limits)
    async with httpx.AsyncClient(timeout=300, transport=transport) as client:

        async def loop() -> None:
            ready.set()  # the first attack is on its way
            while not stop.is_set():
                try:
                    await attack(client, server, hostile, tokens)
                except httpx.HTTPError:
                    hostile.add(599)

        await asyncio.gather(*(loop() for _ in range(attackers)))
    return hostile


def attacker_process(
    name: str, url: str, attackers: int, tokens: int, stop: Any, ready: Any, results: Any, pin: bool
) -> None:
    """The hostile clients run in their own process, so their work does not slow the measuring one."""
    if pin:
        os.sched_setaffinity(0, {attacker_core()})
    tally = asyncio.run(attack_loops(name, url, attackers, tokens, stop, ready))
    results.put((tally.sent, dict(tally.statuses)))


def attacker_core() -> int:
    return max(os.sched_getaffinity(0))


def measure(
    server: Server, attack: str | None, attackers: int, samples: int, tokens: int, pin: bool = False
) -> tuple[float, Tally, Tally]:
    """Median latency of `samples` normal requests while `attackers` clients loop on `attack`."""
    hostile, normal_tally = Tally(), Tally()
    ctx = multiprocessing.get_context("spawn")
    stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
    process = None
    if attack is not None:
        process = ctx.Process(
            target=attacker_process, args=(attack, server.url, attackers, tokens, stop, ready, results, pin)
        )
        process.start()
        if not ready.wait(120):
            raise RuntimeError(f"the {attack} attackers did not start")
        time.sleep(1.0)  # the attack under way first

    async def normals() -> list[float]:
        async with httpx.AsyncClient(timeout=300) as client:
            return [await normal(client, server, tokens, normal_tally) for _ in range(samples)]

    try:
        latencies = asyncio.run(normals())
    finally:
        if process is not None:
            stop.set()
            sent, statuses = results.get(timeout=600)
            process.join(60)
            hostile.sent, hostile.statuses = sent, Counter(statuses)
    return statistics.median(latencies), hostile, normal_tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("llamacpp", "fake"), default="llamacpp")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--samples", type=int, default=7, help="normal requests per measurement (median)")
    ap.add_argument("--attackers", type=int, default=4, help="hostile clients at once")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated attacks; default all: " + ",".join(ATTACKS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pin", action="store_true", help="pin the attackers' process to one core (the last)")
    ap.add_argument("--abuse-rate", type=float, default=None, help="the server's --abuse-rate (0: off)")
    args = ap.parse_args()
    chosen = [a for a in args.only.split(",") if a] or list(ATTACKS)
    serve = ["--api-only", "--log-level", "WARNING", "--max-new-tokens", str(args.tokens)]
    serve += (
        ["--engine", "fake"]
        if args.engine == "fake"
        else ["--model-path", args.model, "--engine", "llamacpp"]
    )
    if args.threads:
        serve += ["--threads", str(args.threads)]
    if args.abuse_rate is not None:
        serve += ["--abuse-rate", str(args.abuse_rate)]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(
        f"hostile: {args.engine}, {args.attackers} attackers from {ATTACKER_ADDRESS}"
        f"{f' pinned to core {attacker_core()}' if args.pin else ''}, {args.samples} samples, "
        f"abuse rate {'default' if args.abuse_rate is None else args.abuse_rate}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="easllm-hostile-") as tmp,
        running_server([*serve, "--data-dir", f"{tmp}/data"], Path(tmp), token=TOKEN, timeout=600) as server,
    ):
        measure(server, None, 0, 2, args.tokens)  # warm-up
        baseline, _, _ = measure(server, None, 0, args.samples, args.tokens)
        print(f"baseline: a {args.tokens}-token request alone takes {baseline * 1000:.0f} ms (median)")
        print(
            f"{'attack':<20} {'sent':>6} {'statuses':<28} {'5xx':>4} "
            f"{'normal ms':>10} {'ratio':>6} {'vs twin':>8}"
        )
        worst = 0.0
        for name in chosen:
            twin = TWIN_OF.get(name)
            latency, hostile, normals = measure(
                server, name, args.attackers, args.samples, args.tokens, args.pin
            )
            twin_text = ""
            if twin is not None:
                twin_latency, _, _ = measure(
                    server, twin, args.attackers, args.samples, args.tokens, args.pin
                )
                twin_text = f"{latency / twin_latency:.2f}x"
            errors = hostile.server_errors + normals.server_errors
            failed |= errors > 0
            ratio = latency / baseline
            worst = max(worst, ratio if twin is None else latency / twin_latency)
            statuses = ",".join(f"{s}:{n}" for s, n in sorted(hostile.statuses.items()))
            print(
                f"{name:<20} {hostile.sent:>6} {statuses:<28} {errors:>4} {latency * 1000:>10.0f} "
                f"{ratio:>5.2f}x {twin_text:>8}"
            )
        log = server.log()
    if "Traceback" in log:
        failed = True
        kept = Path(tempfile.gettempdir()) / "easllm-hostile-server.log"
        kept.write_text(log)
        print(f"FAIL the server logged {log.count('Traceback')} traceback(s): see {kept}")
    print(f"worst ratio (vs twin where there is one): {worst:.2f}x (target <= 1.5x)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
