"""Streaming cost of the OpenAI API vs the EAS API on one server: what SSE + the SDK add per request.

One `easllm serve` (gemma3-270m by default), greedy, the same raw prompt and token count through
three clients in turn: EAS NUL-delimited streaming (requests), /v1/completions SSE (httpx), and
the `openai` SDK. The table gives medians over --runs of time to first text and total time, and
the ratio to EAS.

    .venv/bin/python bench/openai_vs_eas.py --runs 5 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import Server, running_server

PROMPT = "Write a short story about a robot who learns to paint."
Run = Callable[[Server, int], tuple[float, float, int]]


def eas(server: Server, tokens: int) -> tuple[float, float, int]:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0, "use_stream_chat": True}
    start = time.perf_counter()
    first = None
    last: dict = {}
    with requests.post(server.url, json=body, headers=server.headers(), stream=True, timeout=300) as r:
        for chunk in r.iter_lines(chunk_size=1, delimiter=b"\0"):
            if chunk:
                last = json.loads(chunk)
                if first is None and last["response"]:
                    first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start, last["usage"]["completion_tokens"]


def sse(server: Server, tokens: int) -> tuple[float, float, int]:
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    used = 0
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers()) as r,
    ):
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data["choices"] and data["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - start, used


def sdk(server: Server, tokens: int) -> tuple[float, float, int]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)
    start = time.perf_counter()
    first = None
    used = 0
    stream = client.completions.create(
        model="any",
        prompt=PROMPT,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            used = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - start, used


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    clients: dict[str, Run] = {"EAS stream": eas, "/v1 SSE (httpx)": sse, "/v1 openai SDK": sdk}
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(["--model-path", args.model, "--threads", str(args.threads)], Path(tmp)) as server,
    ):
        for run in clients.values():  # warm-up
            run(server, 4)
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in clients}
        for _ in range(args.runs):  # interleaved, so drift in machine load hits every client alike
            for name, run in clients.items():
                results[name].append(run(server, args.tokens))
    base_total = statistics.median(r[1] for r in results["EAS stream"])
    print(f"model {args.model}, {args.tokens} tokens, greedy, median of {args.runs} runs")
    print(f"{'client':<18} {'first text ms':>14} {'total ms':>10} {'tokens':>7} {'vs EAS':>7}")
    for name, rows in results.items():
        ttft = statistics.median(r[0] for r in rows) * 1000
        total = statistics.median(r[1] for r in rows)
        tokens = statistics.median(r[2] for r in rows)
        print(f"{name:<18} {ttft:>14.1f} {total * 1000:>10.1f} {tokens:>7.0f} {total / base_total:>7.3f}")


if __name__ == "__main__":
    main()
