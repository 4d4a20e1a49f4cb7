"""Does prefix-aware routing pay? Concurrent multi-round conversations through the gateway, with
the console's `--routing prefix` against `--routing least-loaded`, in one run.

For each policy: start `easllm console --routing POLICY`, deploy the model with `--replicas`
replicas, and run `--conversations` conversations at once, `--rounds` rounds each, through the
gateway's OpenAI API (streamed). Each conversation has its own long system prompt, so a round
finds its earlier rounds in a replica's prefix cache only if it reaches the replica that served
them. Printed per policy, over rounds 2..N: the share of prompt tokens the replica reported as
cached (`usage.prompt_tokens_details.cached_tokens`; 0 when the engine does not report it), time
to the first token (p50, mean; round 1 apart), and the requests each replica served.

    .venv/bin/python bench/routing.py                 # Qwen2.5 0.5B, 2 replicas x 1 thread, 8 x 6 rounds
    .venv/bin/python bench/routing.py --conversations 2 --rounds 2 --system-words 60   # smoke run
    .venv/bin/python bench/routing.py --threads 2 --system-words 600 --policies prefix
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

ADMIN = "bench-admin-token"
WORDS = [
    "river",
    "mountain",
    "lantern",
    "harbor",
    "orchard",
    "meadow",
    "copper",
    "violet",
    "thunder",
    "marble",
    "falcon",
    "willow",
    "quartz",
    "ember",
    "glacier",
    "saffron",
    "canyon",
    "velvet",
    "comet",
    "juniper",
    "beacon",
    "pebble",
    "tundra",
    "maple",
    "cobalt",
]


@dataclass
class Round:
    conversation: int
    number: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_prompt(conversation: int, words: int) -> str:
    rng = random.Random(conversation)
    return f"Conversation {conversation}. Background: " + " ".join(rng.choice(WORDS) for _ in range(words))


def one_round(url: str, token: str, messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, text, usage = None, [], {}
    with requests.post(url, json=body, headers={"Authorization": token}, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"round failed: {r.status_code} {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(piece)
            usage = chunk.get("usage") or usage
    return (ttft if ttft is not None else time.perf_counter() - started), "".join(text), usage


def conversation(url: str, token: str, n: int, args: argparse.Namespace) -> list[Round]:
    messages = [{"role": "system", "content": system_prompt(n, args.system_words)}]
    rounds = []
    for number in range(1, args.rounds + 1):
        messages.append({"role": "user", "content": f"Question {number}: what comes next in the story?"})
        ttft, text, usage = one_round(url, token, messages, args.max_new_tokens)
        messages.append({"role": "assistant", "content": text})
        details = usage.get("prompt_tokens_details") or {}
        rounds.append(
            Round(n, number, ttft, usage.get("prompt_tokens", 0), details.get("cached_tokens") or 0)
        )
    return rounds


class Console:
    def __init__(self, policy: str, args: argparse.Namespace) -> None:
        self.state = Path(tempfile.mkdtemp(prefix=f"easllm-bench-routing-{policy}-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = {"Authorization": f"Bearer {ADMIN}"}
        cmd = [sys.executable, "-m", "easllm.cli", "console", "--port", str(self.port),
               "--state-dir", str(self.state), "--admin-token", ADMIN, "--log-level", "WARNING",
               "--routing", policy]  # fmt: skip
        log = (self.state / "console.log").open("wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        for _ in range(300):
            try:
                if requests.get(f"{self.base}/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise SystemExit(f"the console did not start: see {self.state / 'console.log'}")

    def deploy(self, args: argparse.Namespace) -> dict:
        serve_args = ["--api-only", "--log-level", "WARNING", "--threads", str(args.threads),
                      "--max-new-tokens", str(args.max_new_tokens), *args.serve_args.split()]  # fmt: skip
        spec = {"name": "bench", "model": args.model, "engine": args.engine, "replicas": args.replicas,
                "args": serve_args}  # fmt: skip
        requests.post(
            f"{self.base}/api/services", json=spec, headers=self.admin, timeout=120
        ).raise_for_status()
        started = time.perf_counter()
        while (service := self.describe())["status"] != "running":
            if service["status"] == "failed" or time.perf_counter() - started > 900:
                raise SystemExit(json.dumps(service["events"], indent=1))
            time.sleep(0.3)
        return service

    def describe(self) -> dict:
        return requests.get(f"{self.base}/api/services/bench", headers=self.admin, timeout=60).json()

    def close(self) -> None:
        try:
            requests.delete(f"{self.base}/api/services/bench", headers=self.admin, timeout=120)
        finally:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
            shutil.rmtree(self.state, ignore_errors=True)


def run_policy(policy: str, args: argparse.Namespace) -> dict:
    console = Console(policy, args)
    try:
        service = console.deploy(args)
        url = f"{service['invocation']['openai_base_url']}/chat/completions"
        before = {r["id"]: r["served"] for r in service["instances"]}
        started = time.perf_counter()
        with ThreadPoolExecutor(args.conversations) as pool:
            results = list(
                pool.map(lambda n: conversation(url, service["token"], n, args), range(args.conversations))
            )
        wall = time.perf_counter() - started
        after = {r["id"]: r["served"] for r in console.describe()["instances"]}
    finally:
        console.close()
    later = [r for rounds in results for r in rounds if r.number >= 2]
    first = [r for rounds in results for r in rounds if r.number == 1]
    prompt = sum(r.prompt_tokens for r in later)
    return {
        "policy": policy,
        "cached_share": sum(r.cached_tokens for r in later) / prompt if prompt else 0.0,
        "ttft_p50": statistics.median(r.ttft for r in later),
        "ttft_mean": statistics.fmean(r.ttft for r in later),
        "ttft_round1_p50": statistics.median(r.ttft for r in first),
        "per_replica": [after[i] - before.get(i, 0) for i in sorted(after)],
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-0.5b-instruct", help="a model with a chat template")
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per replica")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--system-words", type=int, default=300, help="words of each conversation's system prompt"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--serve-args", default="", help="more `easllm serve` flags for the replicas")
    parser.add_argument("--policies", default="prefix,least-loaded")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (rounds 2..N are measured)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the consoles

    rows = [run_policy(p.strip(), args) for p in args.policies.split(",") if p.strip()]
    print(
        f"\n{args.model} on {args.engine}, {args.replicas} replicas x {args.threads} thread(s), "
        f"{args.conversations} conversations x {args.rounds} rounds, system prompt {args.system_words} words"
    )
    header = ("policy", "cached %", "TTFT p50", "TTFT mean", "round1 p50", "wall s")
    print("{:14} {:>9} {:>9} {:>10} {:>11} {:>7}  per replica".format(*header))
    for r in rows:
        print(
            f"{r['policy']:14} {100 * r['cached_share']:8.1f}% {r['ttft_p50']:8.3f}s {r['ttft_mean']:9.3f}s "
            f"{r['ttft_round1_p50']:10.3f}s {r['wall']:7.1f}  {r['per_replica']}"
        )
    print("(TTFT and cached share over rounds 2..N; cached % is 0 where the engine reports no cached_tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
