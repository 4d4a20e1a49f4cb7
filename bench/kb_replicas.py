"""The shared knowledge-base store: what a replica pays for staying current with the database.

Two `SqlStore` objects on one database stand for two replicas. For each size it reports: a search
when nothing changed (the generation read + FAISS), the write of one more file through replica A
(one transaction), and replica B's first search after it (catching up: the new rows only), against
the same search on a bare in-memory FAISS index (what a replica alone did before). Vectors are
random unit vectors (384-d, like multilingual-e5-small); no embedder runs.

    .venv/bin/python bench/kb_replicas.py --sizes 1000 10000 --queries 200
    .venv/bin/python bench/kb_replicas.py --url postgresql+psycopg://user@host/db   # PostgreSQL
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.rag.splitter import Chunk
from easllm.rag.sql_schema import sqlite_url
from easllm.rag.sql_store import SqlStore
from easllm.rag.store import StoredFile

DIM = 384
FILE_CHUNKS = 20  # chunks of the file written during the run


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def put(store: SqlStore, name: str, vectors: np.ndarray) -> None:
    chunks = [Chunk(name, f"{name} passage {i} " * 20) for i in range(len(vectors))]
    record = StoredFile(name, "txt", 1000, len(chunks), None, time.time(), uuid.uuid4().hex)
    store.put_file(record, chunks, vectors, "random", original=b"x" * 1000)


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f}"


def measure(url: str, size: int, queries: int, rng: np.random.Generator) -> dict[str, str]:
    base = f"bench-{uuid.uuid4().hex[:8]}"
    a, b = SqlStore(url, base), SqlStore(url, base)
    started = time.perf_counter()
    for start in range(0, size, 1000):  # files of 1000 chunks
        put(a, f"seed-{start}.txt", unit_rows(rng, min(1000, size - start)))
    seed_s = time.perf_counter() - started
    b.search(unit_rows(rng, 1)[0], 3)  # b's first catch-up: the whole base
    probes = unit_rows(rng, queries)
    steady = []
    for q in probes:
        t = time.perf_counter()
        b.search(q, 3)
        steady.append(time.perf_counter() - t)
    writes, catch_ups = [], []
    for i in range(5):
        vectors = unit_rows(rng, FILE_CHUNKS)
        t = time.perf_counter()
        put(a, f"new-{i}.txt", vectors)
        writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        hit = b.search(vectors[0], 1)[0]
        catch_ups.append(time.perf_counter() - t)
        assert hit.chunk.source == f"new-{i}.txt"
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(unit_rows(rng, size))
    bare = []
    for q in probes:
        t = time.perf_counter()
        index.search(q.reshape(1, -1), 3)
        bare.append(time.perf_counter() - t)
    for name in [f.name for f in a.files()]:
        a.remove_file(name)
    a.close()
    b.close()
    return {
        "chunks": str(size),
        "seed s": f"{seed_s:.2f}",
        "search ms (no change)": ms(steady),
        "bare FAISS ms": ms(bare),
        f"write {FILE_CHUNKS} chunks ms": ms(writes),
        "other replica's next search ms": ms(catch_ups),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000], help="chunks in the base")
    parser.add_argument("--queries", type=int, default=200, help="searches per size")
    parser.add_argument("--url", default=None, help="database URL (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or sqlite_url(Path(tmp) / "knowledge.db")
        rows = [measure(url, size, args.queries, rng) for size in args.sizes]
    backend = url.split(":", 1)[0]
    print(f"knowledge-base store on {backend}, {DIM}-d vectors, medians")
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(row[c].rjust(len(c)) for c in columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
