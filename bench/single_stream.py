"""Single-stream decode speed: `easllm serve` (HTTP streaming) vs llama-cpp-python directly.

Both run in this one process run, on the same GGUF, greedy, the same prompt and token count;
the table gives medians over --runs and the ratio easllm / direct.

    .venv/bin/python bench/single_stream.py --models gemma3-270m qwen2.5-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.config import easllm_home
from easllm.models.bundled import bundled_model, ensure_bundled
from tests.servers import running_server

PROMPT = "Write a short story about a robot who learns to paint."


def direct(gguf: Path, tokens: int, runs: int, threads: int) -> list[tuple[float, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    out = []
    for _ in range(runs):
        llm.reset()
        start = time.perf_counter()
        first = None
        n = 0
        for _tok in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= tokens:
                break
        end = time.perf_counter()
        assert first is not None
        out.append(((n - 1) / (end - first), first - start))
    del llm
    return out


def served(model: str, tokens: int, runs: int, threads: int) -> list[tuple[float, float]]:
    out = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(
            ["--model-path", model, "--threads", str(threads), "--max-new-tokens", str(tokens)],
            Path(tmp),
            token=None,
        ) as server,
    ):
        body = {
            "prompt": PROMPT,
            "temperature": 0,
            "max_new_tokens": tokens,
            "use_stream_chat": True,
            "stream_format": "delta",
            "no_template": True,
            "stop": [],
        }
        for _ in range(runs):
            start = time.perf_counter()
            first = None
            last = None
            r = requests.post(server.url, json=body, stream=True, timeout=300)
            for chunk in r.iter_lines(delimiter=b"\0"):
                if not chunk:
                    continue
                data = json.loads(chunk)
                if first is None:
                    first = time.perf_counter()
                last = data
            end = time.perf_counter()
            assert first is not None and last is not None
            n = last["usage"]["completion_tokens"]
            out.append(((n - 1) / (end - first), first - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-0.5b-instruct"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        bundled = bundled_model(name)
        assert bundled is not None, name
        gguf = ensure_bundled(bundled, easllm_home())
        d = direct(gguf, args.tokens, args.runs, args.threads)
        s = served(name, args.tokens, args.runs, args.threads)
        d_tps = statistics.median(x[0] for x in d)
        s_tps = statistics.median(x[0] for x in s)
        rows.append(
            (
                name,
                d_tps,
                s_tps,
                s_tps / d_tps,
                statistics.median(x[1] for x in d),
                statistics.median(x[1] for x in s),
            )
        )
    print(f"\nsingle stream, greedy, {args.tokens} new tokens, {args.threads} threads, median of {args.runs}")
    print(
        f"{'model':24} {'direct tok/s':>13} {'easllm tok/s':>13} {'ratio':>7} "
        f"{'direct TTFT':>12} {'easllm TTFT':>12}"
    )
    for name, d_tps, s_tps, ratio, d_ttft, s_ttft in rows:
        print(f"{name:24} {d_tps:13.1f} {s_tps:13.1f} {ratio:7.2f} {d_ttft:11.3f}s {s_ttft:11.3f}s")


if __name__ == "__main__":
    main()
