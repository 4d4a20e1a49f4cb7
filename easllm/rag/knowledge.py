"""`KnowledgeBase`: a service's files, chunked, embedded and searchable; the API of RAG.

Used by the HTTP routes, the chat service (`langchain: true`) and the WebUI:

    kb = KnowledgeBase(data_dir / "knowledge", SharedEmbedder(), KnowledgeConfig(), name="svc")
    kb.add_file("install.md", data, progress=print)     # -> StoredFile; re-adding a name replaces it
    kb.files()                                          # -> [StoredFile(name, kind, size, chunks, ...)]
    kb.search("How do I install deepspeed?")            # -> [Hit(chunk, score, id)], best first (hybrid)
    kb.context("How do I install deepspeed?")           # -> the same, neighbouring chunks merged
    kb.remove_file("install.md")

Every method blocks (parsing, embedding, the database): call them off the event loop. Files,
originals, chunks and vectors are rows of one database (`sql_store.SqlStore`): SQLite at
`root/knowledge.db` by default, or `KnowledgeConfig.database_url` (PostgreSQL for replicas on several
machines), shared by every replica of the service. A FaissStore folder of earlier versions under
`root/index` is moved into it on first start (`migrate.py`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from easllm.config import KnowledgeConfig
from easllm.errors import Conflict, InvalidRequest, StorageFull, TooLarge
from easllm.rag.embedder import Embedder, SharedEmbedder
from easllm.rag.loaders import PARAM, file_kind, load_document, safe_file_name
from easllm.rag.migrate import migrate_faiss_folder
from easllm.rag.retriever import MODES, merge_adjacent, retrieve
from easllm.rag.splitter import Chunk, Splitter
from easllm.rag.sql_schema import sqlite_url
from easllm.rag.sql_store import EmbedderMismatch, SqlStore
from easllm.rag.store import Hit, StoredFile, VectorStore

log = logging.getLogger(__name__)

EMBED_BATCH = 64  # passages per embedder call (split over the cores): one progress step


@dataclass(frozen=True)
class IngestProgress:
    """Where an upload stands: stage 'parsing', 'embedding' (done/total chunks), 'saving', 'done', or
    'unchanged' (the same bytes are indexed under that name already: nothing is redone)."""

    file: str
    stage: str
    done: int = 0
    total: int = 0
    rate: float = 0.0  # chunks embedded per second so far
    eta_s: float | None = None  # seconds of embedding left, once a batch is done

    def describe(self) -> str:
        """'embedding 64/238 chunks, 12.5 chunks/s, about 14 s left'."""
        if self.stage != "embedding":
            return self.stage
        text = f"embedding {self.done}/{self.total} chunks"
        if self.rate > 0 and self.eta_s is not None:
            text += f", {self.rate:.1f} chunks/s, about {_duration(self.eta_s)} left"
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class IngestFailure:
    """A file of a multi-file upload that was refused; the others are still added."""

    name: str
    status: int  # the HTTP status its error maps to: 400, 413, 415
    message: str


Progress = Callable[[IngestProgress], None]


class FileNotInKnowledgeBase(LookupError):
    pass


class KnowledgeBase:
    def __init__(
        self,
        root: Path,
        embedder: SharedEmbedder | Embedder,
        config: KnowledgeConfig | None = None,
        store: VectorStore | None = None,
        name: str = "easllm",
    ) -> None:
        """`name` is the service's: one database may hold the knowledge bases of several."""
        self.root = root
        self.config = config or KnowledgeConfig()
        if self.config.retrieval not in MODES:
            raise ValueError(f"retrieval {self.config.retrieval!r}: choose one of {', '.join(MODES)}")
        self.splitter = Splitter(self.config.chunk_size, self.config.chunk_overlap)
        self._embedder_source = embedder
        if store is None:
            sql = SqlStore(self.config.database_url or sqlite_url(root / "knowledge.db"), name)
            migrate_faiss_folder(sql, root)
            store = sql
        self.store: VectorStore = store
        built_by = self.store.embedder
        if built_by is not None and built_by != self.embedder_name:
            log.error("%s", self._mismatch_message(built_by))

    def close(self) -> None:
        """Let go of the store's database connections."""
        self.store.close()

    # -- reading --------------------------------------------------------------------------------

    @property
    def embedder_name(self) -> str:
        return self._embedder_source.name

    def files(self) -> list[StoredFile]:
        return self.store.files()

    def chunk_count(self) -> int:
        return self.store.chunk_count()

    def is_empty(self) -> bool:
        return self.store.chunk_count() == 0

    def original(self, name: str) -> bytes:
        """The uploaded bytes of an indexed file."""
        data = self.store.original(name)
        if data is None:
            raise FileNotInKnowledgeBase(name)
        return data

    def search(
        self, query: str, top_k: int | None = None, min_score: float | None = None, mode: str | None = None
    ) -> list[Hit]:
        """The chunks for `query`, best first (`retriever.retrieve`); defaults from the config."""
        if not query.strip():
            raise InvalidRequest("the query is empty", "query")
        if self.is_empty():
            return []
        self._check_embedder()
        k = self.config.top_k if top_k is None else top_k
        threshold = self.config.score_threshold if min_score is None else min_score
        vector = self._embedder().embed_queries([query])[0]
        return retrieve(self.store, query, vector, k, threshold, mode or self.config.retrieval)

    def context(self, question: str) -> list[Hit]:
        """The excerpts a grounded answer reads: the search's chunks, neighbours merged into one."""
        return merge_adjacent(self.search(question), self.config.chunk_overlap)

    # -- writing --------------------------------------------------------------------------------

    def add_file(self, name: str, data: bytes, progress: Progress | None = None) -> StoredFile:
        """Parse, chunk, embed and index one file; a file of the same name is replaced.

        Raises InvalidRequest (400), TooLarge (413), UnsupportedMedia (415) or Conflict (409)."""
        report = progress or (lambda _: None)
        safe = safe_file_name(name)
        file_kind(safe)
        limit = int(self.config.max_file_mb * 1024 * 1024)
        if len(data) > limit:
            raise TooLarge(f"{safe} is {len(data)} bytes; the limit is {self.config.max_file_mb:g} MB", PARAM)
        self._check_embedder()
        digest = hashlib.sha256(data).hexdigest()
        existing = next((f for f in self.store.files() if f.name == safe), None)
        if existing is not None and existing.sha256 == digest:
            report(IngestProgress(safe, "unchanged", existing.chunks, existing.chunks))
            return existing  # the same bytes again: nothing to redo
        report(IngestProgress(safe, "parsing"))
        doc = load_document(safe, data)
        chunks = self.splitter.split(doc)
        if not chunks:
            raise InvalidRequest(f"{safe} contains no text", PARAM)
        vectors = self._embed(safe, chunks, report)
        stored = StoredFile(safe, doc.kind, len(data), len(chunks), doc.pages, time.time(), digest)
        report(IngestProgress(safe, "saving", len(chunks), len(chunks)))
        try:  # one transaction: the file, its original and its chunks, or nothing
            self.store.put_file(stored, chunks, vectors, self.embedder_name, original=data)
        except EmbedderMismatch as exc:  # another replica filled the base with another embedder
            raise Conflict(
                self._mismatch_message(self.store.embedder or str(exc)), "embedding_model"
            ) from exc
        except OSError as exc:  # disk full, quota, read-only: the knowledge base stays as it was
            log.error("knowledge base: %s not saved: %s", safe, exc)
            raise StorageFull(
                f"{safe} could not be saved: {exc.strerror or exc} on the server's disk; "
                "the knowledge base is unchanged",
                PARAM,
            ) from exc
        log.info("knowledge base: %s indexed (%s, %d chunks)", safe, doc.kind, len(chunks))
        report(IngestProgress(safe, "done", len(chunks), len(chunks)))
        return stored

    def add_files(
        self, items: Iterable[tuple[str, bytes]], progress: Progress | None = None
    ) -> tuple[list[StoredFile], list[IngestFailure]]:
        """Add each file on its own: one refused file does not keep the others out."""
        added: list[StoredFile] = []
        failed: list[IngestFailure] = []
        for name, data in items:
            try:
                added.append(self.add_file(name, data, progress))
            except InvalidRequest as exc:
                failed.append(IngestFailure(name, exc.status, exc.message))
        return added, failed

    def add_path(self, path: Path, progress: Progress | None = None) -> StoredFile:
        return self.add_file(path.name, path.read_bytes(), progress)

    def remove_file(self, name: str) -> StoredFile:
        try:
            removed = self.store.remove_file(name)
        except OSError as exc:
            raise StorageFull(
                f"{name} could not be removed: {exc.strerror or exc} on the server's disk; "
                "the knowledge base is unchanged",
                "name",
            ) from exc
        if removed is None:
            raise FileNotInKnowledgeBase(name)
        log.info("knowledge base: %s removed", name)
        return removed

    # -- internals ------------------------------------------------------------------------------

    def _embedder(self) -> Embedder:
        source = self._embedder_source
        return source.get() if isinstance(source, SharedEmbedder) else source

    def _embed(self, name: str, chunks: list[Chunk], report: Progress) -> np.ndarray:
        embedder = self._embedder()
        texts = [c.embedding_text() for c in chunks]
        unique = list(dict.fromkeys(texts))  # repeated boilerplate is embedded once
        parts = []
        started = time.monotonic()
        total = len(unique)
        report(IngestProgress(name, "embedding", 0, total))
        for start in range(0, total, EMBED_BATCH):
            batch = unique[start : start + EMBED_BATCH]
            parts.append(embedder.embed_passages(batch))
            done = start + len(batch)
            rate = done / max(time.monotonic() - started, 1e-6)
            report(IngestProgress(name, "embedding", done, total, rate, (total - done) / rate))
            if total > EMBED_BATCH * 4 and (start // EMBED_BATCH) % 4 == 3:
                log.info("%s: embedded %d/%d chunks, %.1f/s", name, done, total, rate)
        log.debug("%s: %d chunks embedded in %.2f s", name, total, time.monotonic() - started)
        vectors = np.concatenate(parts)
        row = {text: i for i, text in enumerate(unique)}
        return vectors[[row[t] for t in texts]]

    def _check_embedder(self) -> None:
        built_by = self.store.embedder
        if built_by is not None and built_by != self.embedder_name:
            raise Conflict(self._mismatch_message(built_by), "embedding_model")

    def _mismatch_message(self, built_by: str) -> str:
        return (
            f"the knowledge base in {self.root} was built with the embedder {built_by}, but this server "
            f"uses {self.embedder_name}: restart with --embedding-model {built_by}, or remove its files "
            "and upload them again"
        )
