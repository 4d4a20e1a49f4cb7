"""Many concurrent streams over HTTP: `easllm serve` against llama.cpp's peers, in one run.

For N concurrent streaming clients (each its own prompt of ~20-100 tokens and its own budget of
64-128 new tokens, greedy), on the same GGUF with the same threads, in rotating order each round:
  easllm        `easllm serve --max-num-seqs N`, streaming EAS requests (continuous batching);
  easllm-nocache  the same with `--no-prefix-cache`: on distinct prompts the cache must cost nothing;
  llama-server  llama.cpp's own C++ server, `-t T -np N -c N x ctx` (built once by bench/peers.py);
  lcpp-server   llama-cpp-python's OpenAI server, `--interrupt_requests False` (one global lock);
  reference     llama-cpp-python's low-level batched decode of all N sequences in one loop, in
                process: no HTTP, no scheduler, argmax in numpy: the physical limit here.
For each N it prints aggregate tokens/s (first request sent to last token received), tokens/s
per stream, TTFT p50/p95 and errors, then the ratios easllm/peer against the issue's targets.
Medians over --rounds: this machine is noisy, so compare the ratios of one run, not runs.

    make bench-serving                  # both bundled models, N = 1 4 8 16 32, 3 rounds
    .venv/bin/python bench/serving.py --models gemma3-270m --clients 1 8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peers import PeerUnavailable, llama_cpp_python_server_available, llama_server_binary
from easllm.config import easllm_home
from easllm.models.bundled import bundled_model, ensure_bundled
from tests.servers import free_port, running_server, stop, wait_ready

TOPICS = [
    "a robot who learns to paint", "the history of the printing press", "why the sky is blue",
    "a lighthouse keeper on a stormy night", "how bread rises", "the first day at a new school",
    "a city built under the sea", "the life cycle of a star", "a dragon who is afraid of fire",
    "how trains changed the world", "a detective who solves crimes with smell",
    "the invention of the telephone", "a garden that grows at night", "how bees make honey",
    "a journey across the desert", "the last library on Earth",
]  # fmt: skip
DETAILS = (
    " Describe the people involved, the places, the sounds and the smells, and what changed for"
    " everyone afterwards. Use plain words, short paragraphs and at least one surprising fact."
)
CTX_PER_SEQ = 512  # the longest prompt (~100 tokens) plus 128 new tokens, with room to spare


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int


def workload(n: int, series: int = 0) -> list[Job]:
    """N different prompts of ~20-100 tokens, each with its own budget of 64-128 new tokens. Each
    series (round) opens its prompts differently, so a prefix cache finds nothing of earlier rounds:
    this benchmark measures distinct prompts (bench/multiturn.py measures reuse)."""
    jobs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)] + (f", part {i // len(TOPICS) + 1}" if i >= len(TOPICS) else "")
        prompt = (
            f"Request {series}.{i}: write a long, detailed essay about {topic}, with an introduction, "
            "three parts and a conclusion."
        )
        jobs.append(Job(prompt + DETAILS * (i % 4), 64 + (41 * i) % 65))
    return jobs


@dataclass
class Run:
    tokens: int = 0
    wall: float = 0.0
    streams: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def ttft(self, q: float) -> float:
        return float(np.percentile(self.ttfts, q)) if self.ttfts else float("nan")


# One streaming client per protocol: yields (token count so far or None, text) per event;
# the harness takes the time of the first event with text as the first token.
Stream = Callable[[Job], Iterator[tuple[int | None, str]]]


def easllm_stream(url: str) -> Stream:
    def stream(job: Job) -> Iterator[tuple[int | None, str]]:
        body = {
            "prompt": job.prompt, "temperature": 0, "max_new_tokens": job.max_tokens,
            "use_stream_chat": True, "stream_format": "delta", "no_template": True,
        }  # fmt: skip
        with requests.post(url, json=body, stream=True, timeout=1800) as r:
            r.raise_for_status()
            for chunk in r.iter_lines(delimiter=b"\0"):
                if chunk:
                    event = json.loads(chunk)
                    yield event.get("usage", {}).get("completion_tokens"), event["response"]

    return stream


def llama_server_stream(url: str) -> Stream:
    def stream(job: Job) -> Iterator[tuple[int | None, str]]:
        body = {
            "prompt": job.prompt, "n_predict": job.max_tokens, "stream": True, "temperature": 0,
            "top_k": 1, "cache_prompt": False,
        }  # fmt: skip
        with requests.post(f"{url}/completion", json=body, stream=True, timeout=1800) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    yield (
                        event.get("tokens_predicted") if event.get("stop") else None,
                        event.get("content", ""),
                    )

    return stream


def openai_completions_stream(url: str, model: str | None = None) -> Stream:
    """The token count from `usage` where the server sends it (vLLM); llama-cpp-python's server
    sends none but streams one chunk per token: then the chunks are counted."""

    def stream(job: Job) -> Iterator[tuple[int | None, str]]:
        body = {
            "prompt": job.prompt, "max_tokens": job.max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {}),
        }  # fmt: skip
        chunks, usage = 0, None
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=1800) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    event = json.loads(line[6:])
                    usage = (event.get("usage") or {}).get("completion_tokens", usage)
                    for choice in event.get("choices") or []:
                        chunks += choice.get("finish_reason") is None or bool(choice.get("text"))
                        yield None, choice.get("text", "")
        yield usage if usage is not None else chunks, ""

    return stream


def concurrently(stream: Stream, jobs: list[Job]) -> Run:
    run = Run(streams=len(jobs))
    lock = threading.Lock()
    start = threading.Barrier(len(jobs) + 1)

    def client(job: Job) -> None:
        start.wait()
        released = time.perf_counter()  # every client is released at once: the TTFT clock
        first, count = None, None
        try:
            for n, text in stream(job):
                if first is None and text:
                    first = time.perf_counter()
                count = n if n is not None else count
        except (requests.RequestException, ValueError, KeyError):
            count = None
        with lock:
            if count is None or first is None:
                run.errors += 1
            else:
                run.tokens += count
                run.ttfts.append(first - released)

    run.wall = together(start, [threading.Thread(target=client, args=(job,)) for job in jobs])
    return run


def together(start: threading.Barrier, threads: list[threading.Thread]) -> float:
    """Start the threads, release them at once through `start` (sized len(threads) + 1), and
    return the seconds from their release until the last one ends."""
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


class Reference:
    """All sequences in one `llama_decode` per step, argmax in numpy: nothing else."""

    def __init__(self, gguf: Path, threads: int, max_seqs: int) -> None:
        import llama_cpp

        self.ll = llama_cpp
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive
        llama_cpp.llama_log_set(self._quiet, None)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params()
        )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = max_seqs * CTX_PER_SEQ, 512, 512, max_seqs
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified, p.swa_full, p.no_perf = True, False, True
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)

    def _tokenize(self, text: str) -> list[int]:
        buf = (self.ll.llama_token * 4096)()
        raw = text.encode()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, 4096, self.add_bos, True)
        return list(buf[:n])

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(entries)
        assert self.ll.llama_decode(self.ctx, b) == 0
        return [
            np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            for i, e in enumerate(entries)
            if e[3]
        ]

    def __call__(self, jobs: list[Job]) -> Run:
        run = Run(streams=len(jobs))
        self.ll.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        seqs = [self._tokenize(job.prompt) for job in jobs]
        entries = [
            (t, pos, s, pos == len(ids) - 1) for s, ids in enumerate(seqs) for pos, t in enumerate(ids)
        ]
        rows: list[np.ndarray] = []
        for i in range(0, len(entries), 512):
            rows += self._decode(entries[i : i + 512])
        last = [int(np.argmax(r)) for r in rows]
        run.ttfts = [time.perf_counter() - t0] * len(seqs)
        alive = {s for s in range(len(seqs)) if not self.ll.llama_vocab_is_eog(self.vocab, last[s])}
        counts = {s: int(s in alive) for s in range(len(seqs))}
        while alive:
            order = sorted(alive)
            rows = self._decode([(last[s], len(seqs[s]) + counts[s] - 1, s, True) for s in order])
            for s, row in zip(order, rows, strict=True):
                last[s] = int(np.argmax(row))
                if self.ll.llama_vocab_is_eog(self.vocab, last[s]) or counts[s] >= jobs[s].max_tokens:
                    alive.discard(s)
                else:
                    counts[s] += 1
        run.tokens = sum(counts.values())
        run.wall = time.perf_counter() - t0
        return run


@contextmanager
def process_server(command: list[str], ready_path: str, log: Path, timeout: float = 300) -> Iterator[str]:
    """Start a peer's server on a free loopback port, wait until `ready_path` answers 200, stop it by PID."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        try:
            wait_ready(process, url + ready_path, timeout, lambda: f"see {log}")
        except (RuntimeError, TimeoutError) as exc:
            raise PeerUnavailable(str(exc)) from exc
        yield url
    finally:
        stop(process)


PEERS = ("easllm", "easllm-nocache", "llama-server", "lcpp-server", "reference", "vllm-serve")


def bench_model(name: str, args: argparse.Namespace, tmp: Path, skipped: dict[str, str]) -> list[dict]:
    bundled = bundled_model(name)
    gguf = ensure_bundled(bundled, easllm_home()) if bundled else Path(name)
    threads = str(args.threads)
    reference = Reference(gguf, args.threads, max(args.clients))
    lcpp = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", threads,
            "--n_threads_batch", threads, "--n_ctx", "2048", "--interrupt_requests", "False"]  # fmt: skip
    rows = []
    with (
        process_server(lcpp, "/v1/models", tmp / "lcpp-server.log")
        if "lcpp-server" not in skipped
        else _nothing() as lcpp_url
    ):
        for n in args.clients:
            easllm_flags = ["--model-path", name, "--threads", threads, "--max-num-seqs", str(n),
                            "--ctx-size", str(CTX_PER_SEQ), "--kv-size", str(n * CTX_PER_SEQ),
                            "--max-new-tokens", "128", "--log-level", "WARNING",
                            "--omp-wait-policy", (args.omp_wait_policy or "auto").lower()]  # fmt: skip
            binary = str(getattr(args, "llama_server", ""))
            llama_server = [binary, "-m", str(gguf), "-t", threads, "-tb", threads, "-np", str(n),
                            "-c", str(n * CTX_PER_SEQ), "--log-disable"]  # fmt: skip
            with (
                running_server(easllm_flags, tmp, token=None) as easllm,
                running_server([*easllm_flags, "--no-prefix-cache"], tmp, token=None)
                if "easllm-nocache" not in skipped
                else _nothing() as nocache,
                process_server(llama_server, "/health", tmp / "llama-server.log")
                if "llama-server" not in skipped
                else _nothing() as llama_url,
            ):
                peers: dict[str, Callable[[list[Job]], Run]] = {
                    "easllm": lambda jobs: concurrently(easllm_stream(easllm.url), jobs),
                    "reference": reference,
                }
                if nocache:
                    peers["easllm-nocache"] = lambda jobs: concurrently(easllm_stream(nocache.url), jobs)
                if llama_url:
                    peers["llama-server"] = lambda jobs: concurrently(llama_server_stream(llama_url), jobs)
                if lcpp_url:
                    peers["lcpp-server"] = lambda jobs: concurrently(
                        openai_completions_stream(lcpp_url), jobs
                    )
                rows.append(measure(name, n, peers, args.rounds))
    return rows


def bench_vllm(model_dir: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """On a GPU: `easllm serve --engine vllm` against `vllm serve`, the same model and batch size,
    both up at once, each with --gpu-share of the GPU's memory."""
    seqs, share = str(max(args.clients)), str(args.gpu_share)
    easllm_flags = ["--model-path", model_dir, "--engine", "vllm", "--max-num-seqs", seqs,
                    "--gpu-memory-utilization", share, "--max-new-tokens", "128",
                    "--log-level", "WARNING", "--api-only"]  # fmt: skip
    vllm_serve = ["vllm", "serve", model_dir, "--served-model-name", "bench", "--max-num-seqs", seqs,
                  "--gpu-memory-utilization", share]  # fmt: skip
    with (
        running_server(easllm_flags, tmp, token=None, timeout=900) as easllm,
        process_server(vllm_serve, "/health", tmp / "vllm-serve.log", timeout=900) as vllm_url,
    ):
        peers: dict[str, Callable[[list[Job]], Run]] = {
            "easllm": lambda jobs: concurrently(easllm_stream(easllm.url), jobs),
            "vllm-serve": lambda jobs: concurrently(openai_completions_stream(vllm_url, "bench"), jobs),
        }
        return [measure(Path(model_dir).name, n, peers, args.rounds) for n in args.clients]


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def measure(name: str, n: int, peers: dict[str, Callable[[list[Job]], Run]], rounds: int) -> dict:
    for run in peers.values():
        run(workload(1, series=-1))  # warm up: first-request costs are not what we compare
    runs: dict[str, list[Run]] = {k: [] for k in peers}
    names = list(peers)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            runs[k].append(peers[k](workload(n, series=r)))
            got = runs[k][-1]
            print(f"  {name} N={n} round {r + 1} {k:14}: {got.tps:6.1f} tok/s, {got.tokens} tokens, "
                  f"TTFT p95 {got.ttft(95):.2f} s, errors {got.errors}", file=sys.stderr)  # fmt: skip
    row: dict = {"model": name, "n": n}
    for k, rs in runs.items():
        row[k] = {
            "tps": statistics.median(x.tps for x in rs),
            "per_stream": statistics.median(x.tps / x.streams for x in rs),
            "p50": statistics.median(x.ttft(50) for x in rs),
            "p95": statistics.median(x.ttft(95) for x in rs),
            "errors": sum(x.errors for x in rs),
        }
    return row


TARGETS = (
    "targets: single stream >= 0.9x llama-server and >= 0.9x reference; 8 and 16 streams >= 0.9x "
    "llama-server and >= 2.3x lcpp-server; TTFT p95 at 8 <= 1.2x llama-server's; "
    "8 and 16 streams >= 0.97x easllm-nocache"
)


def ratio(row: dict, peer: str, key: str = "tps") -> str:
    return f"{row['easllm'][key] / row[peer][key]:.2f}x" if peer in row and row[peer][key] else "-"


def print_tables(rows: list[dict], args: argparse.Namespace, skipped: dict[str, str]) -> None:
    print(
        f"\nprompts ~20-100 tokens, 64-128 new tokens per stream, greedy, {args.threads} threads, "
        f"median of {args.rounds}; OMP_WAIT_POLICY {args.omp_wait_policy or 'each peer its own default'}; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    print(f"{'model':22} {'N':>3} {'peer':14} {'tok/s':>7} {'/stream':>7} {'TTFT p50':>8} {'p95':>7} errors")
    for row in rows:
        for k in PEERS:
            if k in row:
                m = row[k]
                print(f"{row['model']:22} {row['n']:3d} {k:14} {m['tps']:7.1f} {m['per_stream']:7.1f} "
                      f"{m['p50']:7.2f}s {m['p95']:6.2f}s {m['errors']:6d}")  # fmt: skip
    if any("vllm-serve" in row for row in rows):
        print("\nratios easllm / vllm serve (target: within 5%, >= 0.95x)")
        print(f"{'model':22} {'N':>3} {'/vllm-serve':>11}  TTFT p95 ratio")
        for row in rows:
            print(f"{row['model']:22} {row['n']:3d} {ratio(row, 'vllm-serve'):>11}  "
                  f"{ratio(row, 'vllm-serve', 'p95')}")  # fmt: skip
        return
    print(f"\nratios easllm / peer ({TARGETS})")
    print(
        f"{'model':22} {'N':>3} {'/llama-server':>13} {'/lcpp-server':>12} {'/reference':>10} "
        f"{'/nocache':>8}  TTFT p95 ratio"
    )
    for row in rows:
        print(f"{row['model']:22} {row['n']:3d} {ratio(row, 'llama-server'):>13} "
              f"{ratio(row, 'lcpp-server'):>12} {ratio(row, 'reference'):>10} "
              f"{ratio(row, 'easllm-nocache'):>8}  "
              f"{ratio(row, 'llama-server', 'p95')}")  # fmt: skip
    for peer, why in skipped.items():
        print(f"note: {peer} skipped: {why}")


def find_peers(skipped: dict[str, str], args: argparse.Namespace) -> None:
    if "llama-server" not in skipped:
        try:
            args.llama_server = llama_server_binary()
        except PeerUnavailable as exc:
            skipped["llama-server"] = str(exc)
    if "lcpp-server" not in skipped and (why := llama_cpp_python_server_available()):
        skipped["lcpp-server"] = why


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "qwen2.5-0.5b-instruct"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["llama-server", "lcpp-server", "easllm-nocache"]
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=["active", "passive"],
        default=None,
        help="OMP_WAIT_POLICY for every peer alike (default: each runs with its own OpenMP defaults)",
    )
    parser.add_argument(
        "--vllm", metavar="HF_DIR", help="GPU: easllm --engine vllm against vllm serve on this model"
    )
    parser.add_argument(
        "--gpu-share", type=float, default=0.4, help="--vllm: GPU memory share of each server"
    )
    args = parser.parse_args()
    if args.omp_wait_policy:  # before llama.cpp loads here or in a peer
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    skipped = {peer: "--skip" for peer in args.skip}
    with tempfile.TemporaryDirectory() as tmp:
        if args.vllm:
            rows = bench_vllm(args.vllm, args, Path(tmp))
        else:
            find_peers(skipped, args)
            rows = [row for name in args.models for row in bench_model(name, args, Path(tmp), skipped)]
    print_tables(rows, args, skipped)


if __name__ == "__main__":
    main()
