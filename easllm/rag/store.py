"""Vector store: chunks and their vectors, searched by inner product (cosine on normalised vectors).

`VectorStore` is the narrow interface the knowledge base needs; `sql_store.SqlStore` (a database
shared by a service's replicas) is the one services use. `FaissStore` is the format before it,
kept as the source of the migration (`rag/migrate.py`) and for the tests that build an old folder:
it keeps one `IndexFlatIP` in memory and
persists it as generations: `gen-N.faiss` and `gen-N.json` (files and chunk texts) are written
to temporary files and renamed, then `manifest.json` is renamed over the old one — the single
commit point. A crash at any moment leaves the previous generation or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from easllm.rag.keyword import KeywordIndex
from easllm.rag.splitter import Chunk

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class StoredFile:
    """One indexed file, as listed to users."""

    name: str
    kind: str  # txt | md | docx | pdf
    size: int  # bytes uploaded
    chunks: int
    pages: int | None
    added_at: float  # seconds since the epoch
    sha256: str


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float
    id: int | None = None  # the store's chunk id: a file's chunks have consecutive ids, in order


class VectorStore(Protocol):
    @property
    def embedder(self) -> str | None:
        """The embedder that built the stored vectors; None while empty."""
        ...

    def files(self) -> list[StoredFile]: ...

    def chunk_count(self) -> int: ...

    def put_file(
        self,
        file: StoredFile,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
        embedder: str,
        original: bytes | None = None,
    ) -> None:
        """Add a file's chunks (and its uploaded bytes), replacing any file of the same name, durably."""
        ...

    def remove_file(self, name: str) -> StoredFile | None: ...

    def original(self, name: str) -> bytes | None:
        """The uploaded bytes of an indexed file, if the store keeps them."""
        ...

    def close(self) -> None: ...

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """Up to k chunks, best first; `vector` is one L2-normalised query embedding."""
        ...

    def keyword_search(self, query: str, k: int) -> list[Hit]:
        """Up to k chunks by BM25 (`keyword.KeywordIndex`), best first; score: the BM25 score."""
        ...

    def similarities(self, vector: np.ndarray, ids: Sequence[int]) -> list[float]:
        """The cosine similarity of `vector` to each chunk id's vector."""
        ...


@dataclass(frozen=True)
class _State:
    files: dict[str, StoredFile]
    chunks: list[Chunk]  # row i of the index is chunks[i]
    index: Any  # faiss.IndexFlatIP, or None while empty
    embedder: str | None
    generation: int
    keywords: KeywordIndex  # ids: rows of the index


def read_generation(root: Path, faiss: Any) -> _State:
    """The committed generation of a FaissStore folder, read without changing anything."""
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        return _State({}, [], None, None, 0, KeywordIndex())
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise RuntimeError(f"{manifest_path}: unknown knowledge-base format {manifest.get('format')}")
    generation = int(manifest["generation"])
    meta = json.loads((root / f"gen-{generation}.json").read_text())
    files = {f["name"]: StoredFile(**f) for f in meta["files"]}
    chunks = [Chunk(*row) for row in meta["chunks"]]
    index = None
    if chunks:
        blob = np.frombuffer((root / f"gen-{generation}.faiss").read_bytes(), dtype=np.uint8)
        index = faiss.deserialize_index(blob)
        if index.ntotal != len(chunks):
            raise RuntimeError(f"{root}: generation {generation} has {index.ntotal} vectors")
    return _State(files, chunks, index, manifest.get("embedder"), generation, _keywords(chunks))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class FaissStore:
    """An exact (flat) FAISS index in memory, persisted under `root` in generations."""

    def __init__(self, root: Path) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # measured: 20x faster than 2 threads on a busy 2-core machine
        self._faiss = faiss
        self.root = root
        self._lock = threading.Lock()  # writers; readers take a snapshot of _state
        self._state = self._load()

    @property
    def embedder(self) -> str | None:
        return self._state.embedder if self._state.chunks else None

    @property
    def dim(self) -> int | None:
        index = self._state.index
        return int(index.d) if index is not None else None

    def files(self) -> list[StoredFile]:
        return sorted(self._state.files.values(), key=lambda f: f.name)

    def chunk_count(self) -> int:
        return len(self._state.chunks)

    def put_file(
        self,
        file: StoredFile,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
        embedder: str,
        original: bytes | None = None,  # kept by the caller, as earlier versions did
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(chunks) or len(chunks) != file.chunks:
            raise ValueError("one vector per chunk, and file.chunks chunks")
        with self._lock:
            state = self._state
            if state.chunks and state.embedder != embedder:
                raise ValueError(f"the store holds {state.embedder} vectors, not {embedder}")
            if state.index is not None and state.index.d != vectors.shape[1]:
                raise ValueError(f"the store holds {state.index.d}-d vectors, not {vectors.shape[1]}-d")
            keep = [i for i, c in enumerate(state.chunks) if c.source != file.name]
            old = self._vectors(state, keep)
            files = {**state.files, file.name: file}
            merged = np.concatenate([old, vectors]) if len(old) else vectors
            self._commit(files, [*(state.chunks[i] for i in keep), *chunks], merged, embedder)

    def remove_file(self, name: str) -> StoredFile | None:
        with self._lock:
            state = self._state
            removed = state.files.get(name)
            if removed is None:
                return None
            keep = [i for i, c in enumerate(state.chunks) if c.source != name]
            files = {k: v for k, v in state.files.items() if k != name}
            chunks = [state.chunks[i] for i in keep]
            self._commit(files, chunks, self._vectors(state, keep), state.embedder if chunks else None)
            return removed

    def original(self, name: str) -> bytes | None:
        return None

    def close(self) -> None:
        pass

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        state = self._state
        if state.index is None or not state.chunks or k < 1:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        scores, ids = state.index.search(query, min(k, len(state.chunks)))
        pairs = zip(scores[0], ids[0], strict=True)
        return [Hit(state.chunks[i], float(s), int(i)) for s, i in pairs if i >= 0]

    def keyword_search(self, query: str, k: int) -> list[Hit]:
        state = self._state
        return [Hit(state.chunks[i], score, i) for i, score in state.keywords.search(query, k)]

    def similarities(self, vector: np.ndarray, ids: Sequence[int]) -> list[float]:
        state = self._state
        if state.index is None or not len(ids):
            return []
        rows = np.asarray(ids, dtype=np.int64)
        return [float(s) for s in state.index.reconstruct_batch(rows) @ np.asarray(vector, dtype=np.float32)]

    # -- persistence ---------------------------------------------------------------------------

    def _vectors(self, state: _State, rows: list[int]) -> np.ndarray:
        if state.index is None or not rows:
            return np.zeros((0, state.index.d if state.index is not None else 0), dtype=np.float32)
        vectors: np.ndarray = state.index.reconstruct_n(0, state.index.ntotal)[rows]
        return vectors

    def _commit(
        self, files: dict[str, StoredFile], chunks: list[Chunk], vectors: np.ndarray, embedder: str | None
    ) -> None:
        generation = self._state.generation + 1
        index = None
        if len(chunks):
            index = self._faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
            blob = self._faiss.serialize_index(index).tobytes()
            write_atomic(self.root / f"gen-{generation}.faiss", blob)
        meta = {
            "files": [asdict(f) for f in files.values()],
            "chunks": [[c.source, c.content, c.page, c.heading] for c in chunks],
        }
        write_atomic(self.root / f"gen-{generation}.json", json.dumps(meta, ensure_ascii=False).encode())
        manifest = {"format": FORMAT, "generation": generation, "embedder": embedder, "chunks": len(chunks)}
        write_atomic(self.root / "manifest.json", json.dumps(manifest).encode())  # the commit point
        self._state = _State(files, chunks, index, embedder, generation, _keywords(chunks))
        self._remove_other_generations(generation)

    def _load(self) -> _State:
        state = read_generation(self.root, self._faiss)
        self._remove_other_generations(state.generation if state.generation else None)
        if state.generation:
            log.info("knowledge base %s: %d files, %d chunks", self.root, len(state.files), len(state.chunks))
        return state

    def _remove_other_generations(self, keep: int | None) -> None:
        """Older generations, and the leftovers of a write that died before its commit."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            generation = path.name.split(".")[0].removeprefix("gen-")
            stale_gen = path.name.startswith("gen-") and generation != str(keep)
            if stale_tmp or stale_gen:
                path.unlink(missing_ok=True)


def _keywords(chunks: list[Chunk]) -> KeywordIndex:
    return KeywordIndex((i, c.embedding_text()) for i, c in enumerate(chunks))
