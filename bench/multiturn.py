"""Conversations over /v1/chat/completions: the prefix cache against a per-slot one and none, in one run.

C concurrent conversations x R rounds, every request resending the whole history (a long
system prompt, a RAG-like document shared by all conversations, then ~15-token user turns,
answers of at most --max-tokens, greedy), on the same GGUF with the same threads:
  easllm          `easllm serve` (prefix cache on: the default), --max-num-seqs min(C, --slots);
  easllm-nocache  the same with --no-prefix-cache;
  llama-server    llama.cpp's own C++ server with `-np min(C, --slots)` slots and its own
                  defaults (its per-slot prompt cache), built once by bench/peers.py.
Per peer and C: TTFT of round 1 (p50) and of rounds 2..R (mean, p50, p95), the share of prompt
tokens the server reports cached in rounds 2..R, aggregate tokens/s (all answers over the wall
time). Then the shared-prefix case: --shared concurrent requests with the same
--shared-system-tokens system prompt and different questions: TTFT p50 and the peak KV cells
easllm uses against one copy of the prefix plus the answers. Each measurement is the median of
--repeats; every repeat starts the system prompt with its own line, so no repeat finds another's
cache. Each server runs with its own OpenMP defaults unless --omp-wait-policy is given.

Full default run (Qwen2.5 0.5B, ~230 prompt tokens/s on 2 cores, C = 1 4 16, R = 6, 3 repeats):
about 2 hours, most of it easllm-nocache and llama-server recomputing 1,900 tokens per round at
16 conversations. A smoke run takes a minute or two:

    make bench-multiturn
    .venv/bin/python bench/multiturn.py --model gemma3-270m --api completions --system-tokens 200 \\
        --conversations 2 --rounds 2 --repeats 1 --shared 2 --shared-system-tokens 150 --skip llama-server
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import PeerUnavailable, llama_server_binary
from bench.serving import process_server, together
from easllm.config import easllm_home
from easllm.models.bundled import bundled_model, ensure_bundled
from tests.servers import running_server

SENTENCES = [
    "The harbour authority keeps a register of every vessel that enters the port after dark.",
    "Each pilot must file a route, a cargo manifest and the name of the master before berthing.",
    "Fees are charged per metre of hull and per day, with a discount for vessels under sail.",
    "In winter the northern channel is closed when ice forms along the breakwater.",
    "Dangerous goods are unloaded only at the eastern quay, far from the passenger terminal.",
    "The lighthouse was automated in 1974, but a keeper still lives in the cottage beside it.",
    "Fishing boats have priority at dawn, when the auction opens in the old market hall.",
    "Any spill must be reported within ten minutes to the duty officer on channel sixteen.",
]  # fmt: skip
QUESTIONS = [
    "When is the northern channel closed?", "Where are dangerous goods unloaded?",
    "How are the fees charged?", "Who has priority at dawn?", "What must a pilot file?",
    "When was the lighthouse automated?", "How fast must a spill be reported?",
    "Who lives in the cottage?", "What is the discount for?", "Which quay is far from passengers?",
]  # fmt: skip
PEERS = ("easllm", "easllm-nocache", "llama-server")


def document(tokens: int, count: Callable[[str], int], tag: str) -> str:
    """A system prompt of about `tokens` tokens: numbered rules, its first line `tag`."""
    lines = [f"{tag}. Answer from these harbour rules in one or two sentences."]
    i = 0
    while count("\n".join(lines)) < tokens:
        lines.append(f"Rule {i + 1}: {SENTENCES[i % len(SENTENCES)]}")
        i += 1
    return "\n".join(lines)


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Result:
    rounds: list[list[Turn]] = field(default_factory=list)  # per round, one turn per conversation
    wall: float = 0.0
    errors: int = 0
    peak_kv_cells: int = 0

    def ttfts(self, first: int, last: int) -> list[float]:
        return [t.ttft for r in self.rounds[first:last] for t in r]

    def cached_share(self) -> float:
        later = [t for r in self.rounds[1:] for t in r]
        prompt = sum(t.prompt_tokens for t in later)
        return sum(t.cached_tokens for t in later) / prompt if prompt else float("nan")

    def tps(self) -> float:
        return sum(t.completion_tokens for r in self.rounds for t in r) / self.wall if self.wall else 0.0


def transcript(messages: list[dict]) -> str:
    """The conversation as one plain-text prompt, for a model without a chat template (--api completions)."""
    names = {"system": "", "user": "User: ", "assistant": "Assistant:"}  # the answer brings its space
    return "\n\n".join(names[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"


def chat(url: str, messages: list[dict], max_tokens: int, api: str = "chat") -> tuple[Turn, str]:
    """One streaming greedy completion of the conversation: its TTFT, usage (cached tokens as the
    server reports them: OpenAI's prompt_tokens_details, or llama-server's timings.cache_n) and text."""
    body = {
        "model": "bench", "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if api == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = transcript(messages)
    t0 = time.perf_counter()
    first, text, usage, timings = None, "", {}, {}
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    with requests.post(f"{url}{path}", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", timings.get("cache_n", 0)) or 0
    turn = Turn(
        first if first is not None else time.perf_counter() - t0,
        int(usage.get("prompt_tokens", 0)),
        int(cached),
        int(usage.get("completion_tokens", 0)),
    )
    return turn, text


def conversations(url: str, system: str, c: int, rounds: int, max_tokens: int, api: str) -> Result:
    """C conversations at once, each R rounds one after another; round r's turns are collected
    across conversations."""
    result = Result(rounds=[[] for _ in range(rounds)])
    lock = threading.Lock()
    start = threading.Barrier(c + 1)

    def talk(k: int) -> None:
        messages = [{"role": "system", "content": system}]
        start.wait()
        for r in range(rounds):
            question = QUESTIONS[(k + r) % len(QUESTIONS)] + f" (conversation {k + 1}, round {r + 1})"
            messages.append({"role": "user", "content": question})
            try:
                turn, text = chat(url, messages, max_tokens, api)
            except (requests.RequestException, ValueError) as exc:
                print(f"    conversation {k + 1} round {r + 1}: {exc}", file=sys.stderr)
                with lock:
                    result.errors += 1
                return
            messages.append({"role": "assistant", "content": text})
            with lock:
                result.rounds[r].append(turn)

    result.wall = together(start, [threading.Thread(target=talk, args=(k,)) for k in range(c)])
    return result


@contextmanager
def kv_watch(url: str | None, result: Result) -> Iterator[None]:
    """Poll easllm's /health for the most KV cells in use while the block runs."""
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                details = requests.get(f"{url}/health", timeout=5).json()["engine"]["details"]
                result.peak_kv_cells = max(result.peak_kv_cells, int(details["kv_cells_used"]))
            except (requests.RequestException, KeyError, ValueError):
                pass
            done.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True) if url else None
    if watcher:
        watcher.start()
    try:
        yield
    finally:
        done.set()
        if watcher:
            watcher.join()


@contextmanager
def servers(
    args: argparse.Namespace, gguf: Path, slots: int, ctx: int, tmp: Path
) -> Iterator[dict[str, str]]:
    """Each peer's base URL, all up for the block."""
    threads = str(args.threads)
    easllm = ["--model-path", str(args.model), "--threads", threads, "--max-num-seqs", str(slots),
              "--ctx-size", str(ctx), "--kv-size", str(slots * ctx), "--log-level", "WARNING",
              "--max-new-tokens", str(args.max_tokens), "--api-only",
              "--omp-wait-policy", (args.omp_wait_policy or "auto").lower()]  # fmt: skip
    with ExitStack() as stack:
        urls: dict[str, str] = {}
        if "easllm" not in args.skip:
            urls["easllm"] = stack.enter_context(running_server(easllm, tmp, token=None)).url
        if "easllm-nocache" not in args.skip:
            nocache = [*easllm, "--no-prefix-cache"]
            urls["easllm-nocache"] = stack.enter_context(running_server(nocache, tmp, token=None)).url
        if "llama-server" not in args.skip:
            binary = str(args.llama_server)
            command = [binary, "-m", str(gguf), "-t", threads, "-tb", threads, "-np", str(slots),
                       "-c", str(slots * ctx), "--log-disable"]  # fmt: skip
            urls["llama-server"] = stack.enter_context(
                process_server(command, "/health", tmp / "llama-server.log")
            )
        yield urls


def tokens_counter(gguf: Path) -> Callable[[str], int]:
    import llama_cpp

    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=True))


def bench(args: argparse.Namespace, gguf: Path, tmp: Path) -> tuple[list[dict], list[dict]]:
    count = tokens_counter(gguf)
    answer_room = args.rounds * (args.max_tokens + 40)
    ctx = 256 * -(-(max(args.system_tokens, args.shared_system_tokens) + answer_room + 256) // 256)
    rows, shared_rows = [], []
    for c in args.conversations:
        slots = min(c, args.slots)
        with servers(args, gguf, slots, ctx, tmp) as urls:
            for url in urls.values():
                chat(url, [{"role": "user", "content": "Hello"}], 4, args.api)  # warm up
            results: dict[str, list[Result]] = {k: [] for k in urls}
            for rep in range(args.repeats):
                system = document(args.system_tokens, count, f"Session {c}.{rep}")
                names = list(urls)
                for k in names[rep % len(names) :] + names[: rep % len(names)]:
                    got = conversations(urls[k], system, c, args.rounds, args.max_tokens, args.api)
                    results[k].append(got)
                    first, later = median_of(got.ttfts(0, 1)), mean_of(got.ttfts(1, args.rounds))
                    print(f"  C={c} repeat {rep + 1} {k:14}: round 1 TTFT p50 {first:.2f} s, "
                          f"later {later:.2f} s, cached {got.cached_share():.0%}, "
                          f"{got.tps():.1f} tok/s, errors {got.errors}", file=sys.stderr)  # fmt: skip
            rows.append(summary(c, results, args.rounds))
    if args.shared:
        slots = min(args.shared, args.slots)
        with servers(args, gguf, slots, ctx, tmp) as urls:
            for url in urls.values():
                chat(url, [{"role": "user", "content": "Hello"}], 4, args.api)
            results = {k: [] for k in urls}
            for rep in range(args.repeats):
                system = document(args.shared_system_tokens, count, f"Shared {rep}")
                for k, url in urls.items():
                    got = Result()
                    with kv_watch(url if k == "easllm" else None, got):
                        got.rounds = conversations(
                            url, system, args.shared, 1, args.max_tokens, args.api
                        ).rounds
                    results[k].append(got)
            prefix = count(system)
            for k, rs in results.items():
                turns = [t for r in rs for t in r.rounds[0]]
                own = statistics.median(
                    sum(t.prompt_tokens - prefix + t.completion_tokens for t in r.rounds[0]) for r in rs
                )
                shared_rows.append({
                    "peer": k, "p50": statistics.median(median_of(r.ttfts(0, 1)) for r in rs),
                    "cached": share(turns),
                    "cells": statistics.median(r.peak_kv_cells for r in rs) if k == "easllm" else None,
                    "one_copy": prefix + own,
                })  # fmt: skip
    return rows, shared_rows


def share(turns: list[Turn]) -> float:
    return sum(t.cached_tokens for t in turns) / max(1, sum(t.prompt_tokens for t in turns))


def median_of(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def mean_of(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def summary(c: int, results: dict[str, list[Result]], rounds: int) -> dict:
    row: dict = {"c": c}
    for k, rs in results.items():
        row[k] = {
            "first": statistics.median(median_of(r.ttfts(0, 1)) for r in rs),
            "later": statistics.median(mean_of(r.ttfts(1, rounds)) for r in rs),
            "p50": statistics.median(median_of(r.ttfts(1, rounds)) for r in rs),
            "p95": statistics.median(float(np.percentile(r.ttfts(1, rounds) or [np.nan], 95)) for r in rs),
            "cached": statistics.median(r.cached_share() for r in rs),
            "tps": statistics.median(r.tps() for r in rs),
            "errors": sum(r.errors for r in rs),
        }
    return row


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a else "-"


def print_tables(
    rows: list[dict], shared: list[dict], args: argparse.Namespace, notes: dict[str, str]
) -> None:
    omp = args.omp_wait_policy or "each server's default"
    print(f"\n{args.model}: system prompt ~{args.system_tokens} tokens, {args.rounds} rounds, answers <= "
          f"{args.max_tokens} tokens, greedy, {args.threads} threads, slots min(C, {args.slots}), median of "
          f"{args.repeats}; OMP_WAIT_POLICY {omp}; load average now {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'C':>3} {'peer':14} {'TTFT r1':>8} {'r2+ mean':>8} {'r2+ p50':>8} {'r2+ p95':>8} "
          f"{'cached r2+':>10} {'tok/s':>7} errors")  # fmt: skip
    for row in rows:
        for k in PEERS:
            if k in row:
                m = row[k]
                print(f"{row['c']:3d} {k:14} {m['first']:7.2f}s {m['later']:7.2f}s {m['p50']:7.2f}s "
                      f"{m['p95']:7.2f}s {m['cached']:10.0%} {m['tps']:7.1f} {m['errors']:6d}")  # fmt: skip
    print(
        "\nratios, rounds 2..R mean TTFT "
        "(targets: easllm / llama-server <= 1.0x at C = 1 and 4, <= 0.8x at 16)"
    )
    print(f"{'C':>3} {'/llama-server':>13} {'/nocache':>9} {'tok/s /llama-server':>20}")
    for row in rows:
        e, ls, nc = row.get("easllm"), row.get("llama-server"), row.get("easllm-nocache")
        print(f"{row['c']:3d} {ratio(e['later'], ls['later']) if e and ls else '-':>13} "
              f"{ratio(e['later'], nc['later']) if e and nc else '-':>9} "
              f"{ratio(e['tps'], ls['tps']) if e and ls else '-':>20}")  # fmt: skip
    if shared:
        print(f"\nshared prefix: {args.shared} concurrent requests, "
              f"the same ~{args.shared_system_tokens}-token "
              "system prompt, different questions (targets: TTFT p50 <= 0.5x nocache; KV cells <= 1.3x one "
              "copy of the prefix plus the answers)")  # fmt: skip
        print(
            f"{'peer':14} {'TTFT p50':>8} {'cached':>7} {'KV cells':>9} {'one copy':>9} {'cells ratio':>11}"
        )
        for s in shared:
            cells = f"{s['cells']:9.0f}" if s["cells"] is not None else f"{'-':>9}"
            cells_ratio = ratio(s["cells"], s["one_copy"]) if s["cells"] is not None else "-"
            print(
                f"{s['peer']:14} {s['p50']:7.2f}s {s['cached']:7.0%} {cells} "
                f"{s['one_copy']:9.0f} {cells_ratio:>11}"
            )
        by = {s["peer"]: s for s in shared}
        if "easllm" in by and "easllm-nocache" in by:
            print(f"TTFT p50 easllm / nocache: {ratio(by['easllm']['p50'], by['easllm-nocache']['p50'])}")
    for peer, why in notes.items():
        print(f"note: {peer} skipped: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="qwen2.5-0.5b-instruct", help="a bundled model name or a GGUF path"
    )
    parser.add_argument("--system-tokens", type=int, default=1900, help="the conversations' system prompt")
    parser.add_argument(
        "--conversations",
        type=int,
        nargs="*",
        default=[1, 4, 16],
        help="C values (none: the shared case only)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="R: user turns per conversation")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per value; the median is shown")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--slots", type=int, default=8, help="most sequences at once (-np / --max-num-seqs)")
    parser.add_argument(
        "--shared", type=int, default=8, help="shared-prefix case: concurrent requests (0: skip)"
    )
    parser.add_argument("--shared-system-tokens", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--api", choices=["chat", "completions"], default="chat",
        help="completions: the conversation as plain text (a model without a chat template: gemma3-270m)",
    )  # fmt: skip
    parser.add_argument("--skip", nargs="*", default=[], choices=PEERS)
    parser.add_argument(
        "--omp-wait-policy", choices=["active", "passive"], default=None,
        help="for every server alike (default: each runs with its own OpenMP defaults)",
    )  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its servers
    for name, low in (("system-tokens", 16), ("rounds", 1), ("repeats", 1), ("max-tokens", 1), ("slots", 1)):
        if getattr(args, name.replace("-", "_")) < low:
            parser.error(f"--{name} must be at least {low}")
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    notes: dict[str, str] = {}
    if "llama-server" not in args.skip:
        try:
            args.llama_server = llama_server_binary()
        except PeerUnavailable as exc:
            notes["llama-server"] = str(exc)
            args.skip.append("llama-server")
    bundled = bundled_model(args.model)
    gguf = ensure_bundled(bundled, easllm_home()) if bundled else Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        rows, shared = bench(args, gguf, Path(tmp))
    print_tables(rows, shared, args, notes)


if __name__ == "__main__":
    main()
