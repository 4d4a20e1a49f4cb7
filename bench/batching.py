"""Many concurrent streams: `easllm serve` (continuous batching) against its peers, in one run.

For N concurrent clients (each its own prompt, greedy, up to --tokens new tokens), on the same
GGUF and thread count, side by side and in rotating order each round:
  easllm     `easllm serve` over HTTP: N streaming EAS clients at once;
  serial     llama-cpp-python one request at a time, in arrival order: what its own server does
             under its global lock (`python -m llama_cpp.server --interrupt_requests False`),
             in-process, so without its HTTP cost;
  reference  llama-cpp-python's low-level batched decode of all N sequences in one loop, no HTTP,
             no scheduler: the physical limit of this machine.
It prints aggregate tokens/s, TTFT p50/p95 and the ratios easllm/serial and easllm/reference
(medians over --rounds). This machine is noisy: compare the ratios of one run, not runs.

    .venv/bin/python bench/batching.py --models gemma3-270m qwen2.5-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.config import easllm_home
from easllm.models.bundled import bundled_model, ensure_bundled
from tests.servers import running_server

TOPICS = [
    "a robot who learns to paint",
    "the history of the printing press",
    "why the sky is blue",
    "a lighthouse keeper on a stormy night",
    "how bread rises",
    "the first day at a new school",
    "a city built under the sea",
    "the life cycle of a star",
    "a dragon who is afraid of fire",
    "how trains changed the world",
    "a detective who solves crimes with smell",
    "the invention of the telephone",
    "a garden that grows at night",
    "how bees make honey",
    "a journey across the desert",
    "the last library on Earth",
]
PROMPTS = [
    f"Write a long, detailed essay about {t}, with an introduction, three parts and a conclusion."
    for t in TOPICS
]


@dataclass
class Run:
    tokens: int = 0
    wall: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def ttft(self, q: float) -> float:
        return float(np.percentile(self.ttfts, q)) if self.ttfts else float("nan")


def via_easllm(url: str, prompts: list[str], tokens: int) -> Run:
    run = Run()
    lock = threading.Lock()
    start = threading.Barrier(len(prompts) + 1)

    def client(prompt: str) -> None:
        body = {
            "prompt": prompt,
            "temperature": 0,
            "max_new_tokens": tokens,
            "use_stream_chat": True,
            "stream_format": "delta",
            "no_template": True,
        }
        start.wait()
        first, last = None, None
        try:
            r = requests.post(url, json=body, stream=True, timeout=900)
            r.raise_for_status()
            for chunk in r.iter_lines(delimiter=b"\0"):
                if chunk:
                    last = json.loads(chunk)
                    if first is None and last["response"]:
                        first = time.perf_counter()
        except (requests.RequestException, ValueError):
            last = None
        with lock:
            if last is None or first is None:
                run.errors += 1
            else:
                run.tokens += last["usage"]["completion_tokens"]
                run.ttfts.append(first - t0)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    run.wall = time.perf_counter() - t0
    return run


class Serial:
    """llama-cpp-python's high-level API, one request after another."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def __call__(self, prompts: list[str], tokens: int) -> Run:
        import llama_cpp

        run = Run()
        vocab = self.llm._model.vocab
        add_bos = self.llm._model.add_bos_token()
        t0 = time.perf_counter()
        for prompt in prompts:
            ids = self.llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
            n = 0
            self.llm.reset()
            for token in self.llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                n += 1
                if n == 1:
                    run.ttfts.append(time.perf_counter() - t0)
                if n >= tokens:
                    break
            run.tokens += n
        run.wall = time.perf_counter() - t0
        return run


class Reference:
    """All sequences in one `llama_decode` per step, argmax in numpy: nothing else."""

    def __init__(self, gguf: Path, threads: int, max_seqs: int = 16) -> None:
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params()
        )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 8192, 512, 512, max_seqs
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified, p.swa_full, p.no_perf = True, False, True
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)

    def _tokenize(self, text: str) -> list[int]:
        buf = (self.ll.llama_token * 4096)()
        n = self.ll.llama_tokenize(
            self.vocab, text.encode(), len(text.encode()), buf, 4096, self.add_bos, True
        )
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

    def __call__(self, prompts: list[str], tokens: int) -> Run:
        run = Run()
        self.ll.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        seqs = [self._tokenize(p) for p in prompts]
        entries = [
            (t, pos, s, pos == len(ids) - 1) for s, ids in enumerate(seqs) for pos, t in enumerate(ids)
        ]
        rows: list[np.ndarray] = []
        for i in range(0, len(entries), 512):
            rows += self._decode(entries[i : i + 512])
        last = [int(np.argmax(r)) for r in rows]
        now = time.perf_counter()
        alive = {s for s in range(len(seqs)) if not self.ll.llama_vocab_is_eog(self.vocab, last[s])}
        run.ttfts = [now - t0] * len(seqs)
        counts = {s: int(s in alive) for s in range(len(seqs))}
        while alive:
            order = sorted(alive)
            rows = self._decode([(last[s], len(seqs[s]) + counts[s] - 1, s, True) for s in order])
            for s, row in zip(order, rows, strict=True):
                last[s] = int(np.argmax(row))
                if self.ll.llama_vocab_is_eog(self.vocab, last[s]) or counts[s] >= tokens:
                    alive.discard(s)
                else:
                    counts[s] += 1
        run.tokens = sum(counts.values())
        run.wall = time.perf_counter() - t0
        return run


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    bundled = bundled_model(name)
    gguf = ensure_bundled(bundled, easllm_home()) if bundled else Path(name)
    serial = Serial(gguf, args.threads)
    reference = Reference(gguf, args.threads, max(args.clients))
    flags = ["--model-path", name, "--threads", str(args.threads), "--max-batch", str(max(args.clients))]
    flags += ["--max-new-tokens", str(args.tokens), "--log-level", "WARNING"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, running_server(flags, Path(tmp), token=None) as server:
        peers = {
            "easllm": lambda p, t: via_easllm(server.url, p, t),
            "serial": serial,
            "reference": reference,
        }
        via_easllm(server.url, PROMPTS[:2], 4)  # warm up
        for n in args.clients:
            runs: dict[str, list[Run]] = {k: [] for k in peers}
            for r in range(args.rounds):
                names = list(peers)
                for k in names[r % 3 :] + names[: r % 3]:
                    runs[k].append(peers[k](PROMPTS[:n], args.tokens))
                    print(f"  {name} N={n} round {r + 1} {k}: {runs[k][-1].tps:.1f} tok/s", file=sys.stderr)
            row: dict = {"model": name, "n": n}
            for k, rs in runs.items():
                row[k] = statistics.median(x.tps for x in rs)
                row[k + "_p50"] = statistics.median(x.ttft(50) for x in rs)
                row[k + "_p95"] = statistics.median(x.ttft(95) for x in rs)
                row[k + "_errors"] = sum(x.errors for x in rs)
            rows.append(row)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.tokens} new tokens per stream, greedy, {args.threads} threads, median of {args.rounds}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'model':22} {'N':>3} {'easllm':>8} {'serial':>8} {'ref':>8} {'/serial':>8} {'/ref':>6}  "
        f"{'TTFT p50/p95 easllm':>20} {'serial':>14} {'ref':>12} {'errors':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:22} {r['n']:3d} {r['easllm']:8.1f} {r['serial']:8.1f} {r['reference']:8.1f} "
            f"{r['easllm'] / r['serial']:7.2f}x {r['easllm'] / r['reference']:5.2f}x  "
            f"{r['easllm_p50']:9.2f}/{r['easllm_p95']:.2f}s {r['serial_p50']:6.2f}/{r['serial_p95']:.2f}s "
            f"{r['reference_p50']:5.2f}/{r['reference_p95']:.2f}s {r['easllm_errors']:6d}"
        )
    print("tok/s: aggregate over all streams, first request sent to last token received.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["gemma3-270m"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        print(
            f"note: llama-cpp-python's own server does not start here ({exc}; it needs the [server] extra: "
            "starlette-context, pydantic-settings); 'serial' reproduces its one-at-a-time behaviour "
            "in-process."
        )
    rows = [row for name in args.models for row in bench_model(name, args)]
    print_table(rows, args)


if __name__ == "__main__":
    main()
