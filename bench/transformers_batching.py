"""Does the transformers engine serve concurrent requests faster with continuous batching?

One run, one model (gemma3-270m, bf16 on CPU): the sequential engine (one request at a time)
against the continuous-batching engine (transformers' ContinuousBatchingManager), N concurrent
greedy requests of 64 new tokens each. Prints aggregate tokens/s and time to first token
(p50/p95), each the median of three rounds, with the load average before and after.

The model: the bundled gemma GGUF converted once to a Hugging Face safetensors folder under
EASLLM_HOME/hf/ (transformers reads the GGUF in 30-75 s; the folder reloads in seconds). The
conversion needs the `gguf` package (`pip install gguf`, or PYTHONPATH to an unpacked wheel).

    .venv/bin/python bench/transformers_batching.py [--concurrency 1 4 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from easllm.config import EngineConfig, easllm_home
from easllm.engine.backends.transformers import TransformersEngine
from easllm.engine.backends.transformers_batching import TransformersBatchingEngine
from easllm.engine.base import Engine
from easllm.engine.types import GenerationRequest, SamplingParams

GGUF = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = [
    "The history of the printing press begins",
    "In a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "To bake a loaf of bread, first",
    "The capital of Japan is Tokyo, a city that",
    "Photosynthesis is the process by which",
    "Once upon a time, a young programmer",
    "The best way to learn a new language is",
]


def gemma_hf_dir() -> Path:
    """The gemma GGUF as a safetensors folder, converted on first use."""
    out = easllm_home() / "hf" / "gemma-3-270m"
    if (out / "config.json").is_file():
        return out
    gguf = easllm_home() / "models" / GGUF
    if not gguf.is_file():
        raise SystemExit(
            f"{gguf} is missing: run `easllm serve --model-path gemma-3-270m` once to assemble it"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} to {out} (once; 30-75 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the weights are dequantized already: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


@dataclass
class Round:
    tokens: int
    seconds: float
    ttfts: list[float]


async def one_request(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    first = 0.0  # time to the first text
    count = 0
    req = GenerationRequest(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    async for delta in engine.generate(req):
        if delta.text and not first:
            first = time.perf_counter() - start
        if delta.usage is not None:
            count = delta.usage.completion_tokens
    return first, count


async def one_round(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Round:
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(engine, p, new_tokens) for p in prompts))
    return Round(sum(n for _, n in results), time.perf_counter() - start, [t for t, _ in results])


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def measure(engine: Engine, prompts: list[list[int]], n: int, rounds: int, new_tokens: int) -> tuple:
    batch = [prompts[i % len(prompts)] for i in range(n)]
    results = [await one_round(engine, batch, new_tokens) for _ in range(rounds)]
    tok_s = statistics.median(r.tokens / r.seconds for r in results)
    ttft50 = statistics.median(statistics.median(r.ttfts) for r in results)
    ttft95 = statistics.median(p95(r.ttfts) for r in results)
    return tok_s, ttft50, ttft95


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None, help="a HF folder instead of the gemma one")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a busy machine: see the report)"
    )
    args = parser.parse_args()
    model_dir = args.model_dir or gemma_hf_dir()
    config = EngineConfig(
        model_path=str(model_dir), engine="transformers", cpu=True, precision="bf16", threads=args.threads
    )
    engines: list[tuple[str, Engine]] = [
        ("sequential", TransformersEngine(model_dir, config, model_dir.name)),
        ("continuous batching", TransformersBatchingEngine(model_dir, config, model_dir.name)),
    ]
    load_before = os.getloadavg()[0]
    rows = []
    for label, engine in engines:
        await engine.start()
        prompts = [engine.tokenize(p) for p in PROMPTS]
        await one_round(engine, prompts[:2], 8)  # warm-up
        for n in args.concurrency:
            tok_s, ttft50, ttft95 = await measure(engine, prompts, n, args.rounds, args.new_tokens)
            rows.append((label, n, tok_s, ttft50, ttft95))
            print(f"  {label} N={n}: {tok_s:.1f} tok/s", flush=True)
        await engine.close()
    load_after = os.getloadavg()[0]

    print(
        f"\n{model_dir.name}, bf16, CPU, greedy, {args.new_tokens} new tokens, median of {args.rounds} rounds"
    )
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {os.cpu_count()} cores")
    print(f"torch threads: {args.threads or 'default'}\n")
    print(f"| {'engine':<20} | {'N':>2} | {'tok/s':>7} | {'TTFT p50 s':>10} | {'TTFT p95 s':>10} |")
    print(f"|{'-' * 22}|{'-' * 3}:|{'-' * 8}:|{'-' * 11}:|{'-' * 11}:|")
    for label, n, tok_s, ttft50, ttft95 in rows:
        print(f"| {label:<20} | {n:>2} | {tok_s:>7.1f} | {ttft50:>10.2f} | {ttft95:>10.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
