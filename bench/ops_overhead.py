"""What metrics and history export cost in serving throughput: one engine behind three apps.

    bare            no access log, no round hook (the app as it was before observability)
    metrics         what `easllm serve` runs without --export-history-path (access log, /metrics)
    metrics+export  with --export-history-path, 1 s periods (rotation and export happen mid-run)

The three apps share one started engine and are driven in-process over ASGI by --clients
concurrent clients sending EAS requests; runs are interleaved (bare, metrics, export, bare, …)
so the machine's load hits all three alike, and the table gives medians over --runs. CPU time
(process time: every client, the server and the engine run in this one process) is the measure
that other load on the machine does not disturb; the wall-clock rate is shown beside it. Then the
round hook alone (CPU per round) and the exporter alone (`record()`, the export copy).

    .venv/bin/python bench/ops_overhead.py                       # fake engine: the overhead's upper bound
    .venv/bin/python bench/ops_overhead.py --model gemma3-270m   # a real model on llama.cpp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.app import create_app
from easllm.chat.template import Conversation
from easllm.config import EngineConfig, SamplingDefaults, ServerConfig, easllm_home
from easllm.engine.base import Engine
from easllm.engine.factory import build_engine
from easllm.engine.types import FinishReason, GenerationRequest, TokenDelta, Usage
from easllm.export.exporter import HistoryExporter
from easllm.models.resolve import resolve_model
from easllm.server.access_log import AccessLog
from easllm.server.metrics import ServiceMetrics
from easllm.server.state import state_of
from easllm.serving.caller import Caller
from easllm.serving.observe import RoundObserver

VARIANTS = ("bare", "metrics", "metrics+export")


def build(variant: str, engine: Engine, tmp: Path, tokens: int) -> Any:
    config = ServerConfig(
        data_dir=tmp / variant,
        sampling=SamplingDefaults(max_new_tokens=tokens, temperature=0.0),
        export_history_path=tmp / "export" if variant == "metrics+export" else None,
        export_interval=1.0,
    )
    app = create_app(config, engine)
    if variant == "bare":
        app.user_middleware = [m for m in app.user_middleware if m.cls is not AccessLog]
        state_of(app).chat.observer = None  # no round is measured or recorded
    history = state_of(app).history
    if history is not None:
        history.start()
    return app


async def drive(app: Any, clients: int, per_client: int, tokens: int) -> tuple[float, float]:
    """(rounds per second, CPU µs per round) for clients x per_client requests. Clients, server and
    engine all run in this process: its CPU time is what a round costs, whatever else loads the
    machine, while the wall-clock rate moves with that load."""
    transport = httpx.ASGITransport(app=app)

    async def one_client(c: int) -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as http:
            for i in range(per_client):
                body = {"prompt": f"client {c} question {i}: tell me about pumps", "max_new_tokens": tokens}
                r = await http.post("/", json=body)
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == tokens

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    rounds = clients * per_client
    return rounds / (time.perf_counter() - start), (time.process_time() - cpu) / rounds * 1e6


async def throughput(
    engine: Engine, args: argparse.Namespace, tmp: Path
) -> dict[str, list[tuple[float, float]]]:
    await engine.start()
    try:
        apps = {v: build(v, engine, tmp, args.tokens) for v in VARIANTS}
        await drive(apps["bare"], args.clients, 2, args.tokens)  # warm-up
        rates: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.runs):
            for v in VARIANTS:
                rates[v].append(await drive(apps[v], args.clients, args.requests, args.tokens))
        history = state_of(apps["metrics+export"]).history
        assert history is not None
        await asyncio.to_thread(history.close)
        exported = sum(len(p.read_bytes().splitlines()) for p in (tmp / "export").glob("history-*.jsonl"))
        expected = args.runs * args.clients * args.requests
        assert exported == expected, f"{exported} records exported, {expected} rounds answered"
        return rates
    finally:
        await engine.close()


async def hook_cost(engine: Engine, tmp: Path, tokens: int, n: int = 2000) -> tuple[float, float]:
    """CPU µs per round that the round hook adds (metrics; metrics + export), timed by
    process_time so that other processes on the machine do not count."""
    conv = Conversation("How do I reset the pump controller? " * 3, "Be brief.", (("q", "a " * 40),) * 2)
    req = GenerationRequest([1] * 50)

    async def deltas() -> AsyncIterator[TokenDelta]:
        for _ in range(tokens):
            yield TokenDelta("r", "word ", [5])
        yield TokenDelta("r", "", [], FinishReason.LENGTH, Usage(50, tokens))

    history = HistoryExporter(tmp / "hook-export", tmp / "hook-wal", 3600)
    observers = [
        None,
        RoundObserver("bench", engine, ServiceMetrics(engine)),
        RoundObserver("bench", engine, ServiceMetrics(engine), history),
    ]
    cpu = []
    for observer in observers:
        start = time.process_time()
        for _ in range(n):
            stream = deltas() if observer is None else observer.watch(deltas(), "eas", Caller(), conv, req)
            async for _delta in stream:
                pass
        cpu.append((time.process_time() - start) / n * 1e6)
    history.close()
    return cpu[1] - cpu[0], cpu[2] - cpu[1]


def exporter_alone(tmp: Path, n: int) -> tuple[float, float, int]:
    """(µs per record(), export MB/s, bytes per record) for n records of a typical round."""
    record = {
        "time": "2026-01-01T00:00:00.000Z",
        "service": "bench",
        "api": "eas",
        "prompt": "How do I reset the pump controller after a pressure fault? " * 3,
        "response": "Switch the controller off, wait ten seconds, and hold RESET while switching on. " * 8,
        "history": [["earlier question", "earlier answer " * 10]] * 2,
        "parameters": {"max_new_tokens": 256, "temperature": 0.7},
        "usage": {"prompt_tokens": 120, "completion_tokens": 180, "total_tokens": 300},
    }
    line = json.dumps(record).encode() + b"\n"
    h = HistoryExporter(tmp / "alone-export", tmp / "alone-wal", 3600)
    start = time.perf_counter()
    for _ in range(n):
        h.record(line)
    per_record = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    assert h.close()
    export_seconds = time.perf_counter() - start
    return per_record, n * len(line) / export_seconds / 1e6, len(line)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--model", default=None, help="bundled model on llama.cpp (default: the fake engine)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client and run")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", type=int, default=20000, help="for the exporter-alone table")
    args = parser.parse_args()
    engine_config = EngineConfig(engine=None if args.model else "fake", threads=args.threads, ctx_size=2048)
    model = None
    if args.model:
        model = resolve_model(args.model, easllm_home(), lambda m: print(m, file=sys.stderr))
        engine_config = replace(engine_config, model_path=args.model)
    engine = build_engine(engine_config, model)
    with tempfile.TemporaryDirectory() as tmp:
        rates = asyncio.run(throughput(engine, args, Path(tmp)))
        metrics_cpu, export_cpu = asyncio.run(hook_cost(engine, Path(tmp), args.tokens))
        per_record, export_mbs, line_bytes = exporter_alone(Path(tmp), args.records)
    name = args.model or "fake engine"
    print(
        f"\n{name}: {args.clients} clients x {args.requests} EAS requests, {args.tokens} new tokens each, "
        f"median of {args.runs} interleaved runs"
    )
    base = statistics.median(cpu for _, cpu in rates["bare"])
    print(f"{'variant':16} {'rounds/s':>9} {'tokens/s':>9} {'CPU µs/round':>13} {'CPU vs bare':>12}")
    for v in VARIANTS:
        rate = statistics.median(r for r, _ in rates[v])
        cpu = statistics.median(c for _, c in rates[v])
        print(f"{v:16} {rate:9.1f} {rate * args.tokens:9.0f} {cpu:13.0f} {cpu / base - 1:+12.1%}")
    print(f"\nthe round hook alone, CPU per {args.tokens}-token round")
    print(f"metrics {metrics_cpu:.0f} µs; history export {export_cpu:.0f} µs more")
    print(f"\nexporter alone, {args.records} records of {line_bytes} bytes")
    print(f"record() {per_record:.1f} µs each (write-ahead log append); export copy {export_mbs:.0f} MB/s")


if __name__ == "__main__":
    main()
