"""`SqlStore`: a service's knowledge base in one database (SQLAlchemy), shared by all its replicas.

The rows are the truth (`sql_schema.py`): `kb_bases` (one per service: a generation counter and
the embedder), `kb_files`, `kb_originals` (the uploaded bytes) and `kb_chunks`. An upload
or a removal is one transaction, which also moves the base's generation; the database serialises
writers (the base row's lock on PostgreSQL, the write lock of SQLite in WAL mode) and a crash
leaves the last committed state. Each store object keeps a FAISS index of the chunk rows as a
cache: before answering it reads the generation (one row by primary key) and, when it moved,
fetches from one snapshot only the chunk rows it lacks and drops the ones gone. A write through
any replica is therefore seen by the next question to every replica.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Row, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from easllm.errors import StoreUnavailable
from easllm.rag.keyword import KeywordIndex
from easllm.rag.splitter import Chunk
from easllm.rag.sql_schema import bases, chunks, files, metadata, open_engine, originals
from easllm.rag.store import Hit, StoredFile

log = logging.getLogger(__name__)

FETCH_BATCH = 500  # chunk rows per SELECT ... WHERE id IN (...) during a catch-up
SCHEMA_LOCK = 0x6B62  # PostgreSQL advisory lock held while the tables are created ("kb")


class EmbedderMismatch(ValueError):
    """The base holds vectors of another embedder or dimension."""


@dataclass(frozen=True)
class FileImport:
    """One file with everything it is stored with: used by uploads and by the migration."""

    file: StoredFile
    chunks: Sequence[Chunk]
    vectors: np.ndarray
    original: bytes | None


@dataclass(frozen=True)
class _Cache:
    generation: int
    files: dict[str, StoredFile]
    ids: np.ndarray  # chunk row ids (int64), ascending; row i of the index is ids[i]
    chunks: list[Chunk]
    vectors: np.ndarray
    index: Any  # faiss.IndexFlatIP, or None while empty
    embedder: str | None


class SqlStore:
    """The `VectorStore` of a knowledge base named `name` (the service) in the database at `url`."""

    def __init__(self, url: str, name: str) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # measured: 20x faster than 2 threads on a busy 2-core machine
        self._faiss = faiss
        self.name = name
        self.engine = open_engine(url)
        self.url = make_url(url).render_as_string(hide_password=True)
        self._postgres = self.engine.dialect.name == "postgresql"
        with self._errors():
            self._create_schema()
            self._base_id = self._base_row_id()
        self._catch_up_lock = threading.Lock()  # one catch-up at a time in this process
        self._keywords = KeywordIndex()  # BM25 over the cached chunks, updated in place by catch-ups
        self._cache = _Cache(-1, {}, np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32), None, None)
        cache = self.sync()
        log.info(
            "knowledge base %s in %s: %d files, %d chunks", name, self.url, len(cache.files), len(cache.ids)
        )

    def close(self) -> None:
        self.engine.dispose()

    # -- reading (each call first catches up with the database) --------------------------------

    @property
    def embedder(self) -> str | None:
        return self.sync().embedder

    @property
    def generation(self) -> int:
        return self.sync().generation

    def files(self) -> list[StoredFile]:
        return sorted(self.sync().files.values(), key=lambda f: f.name)

    def chunk_count(self) -> int:
        return len(self.sync().ids)

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        cache = self.sync()
        if cache.index is None or k < 1:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        scores, rows = cache.index.search(query, min(k, len(cache.ids)))
        pairs = zip(scores[0].tolist(), rows[0].tolist(), strict=True)
        return [Hit(cache.chunks[i], s, int(cache.ids[i])) for s, i in pairs if i >= 0]

    def keyword_search(self, query: str, k: int) -> list[Hit]:
        """Up to k chunks by BM25 (`keyword.KeywordIndex`), best first; score: the BM25 score."""
        cache = self.sync()
        found = self._keywords.search(query, k)
        if not found:
            return []
        rows, present = _rows_of(cache.ids, np.asarray([i for i, _ in found], dtype=np.int64))
        # A chunk a concurrent catch-up just indexed is not in this snapshot yet: left out.
        pairs = zip(found, rows.tolist(), present.tolist(), strict=True)
        return [Hit(cache.chunks[row], score, chunk_id) for (chunk_id, score), row, ok in pairs if ok]

    def similarities(self, vector: np.ndarray, ids: Sequence[int]) -> list[float]:
        """The cosine similarity of `vector` to each chunk id's vector (-1 for an id gone meanwhile)."""
        cache = self._cache
        if not len(ids):
            return []
        rows, present = _rows_of(cache.ids, np.asarray(ids, dtype=np.int64))
        if not len(cache.ids):
            return [-1.0] * len(ids)
        scores = cache.vectors[rows] @ np.asarray(vector, dtype=np.float32)
        similarities: list[float] = np.where(present, scores, -1.0).tolist()
        return similarities

    def original(self, name: str) -> bytes | None:
        """The uploaded bytes of an indexed file."""
        query = (
            select(originals.c.data)
            .join(files, files.c.id == originals.c.file_id)
            .where(files.c.base_id == self._base_id, files.c.name == name)
        )
        with self._errors(), self.engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    def sync(self) -> _Cache:
        """The cache as of the database's latest commit: one row read when nothing changed."""
        with self._errors(), self.engine.connect() as conn:
            generation = conn.execute(
                select(bases.c.generation).where(bases.c.id == self._base_id)
            ).scalar_one()
        if generation == self._cache.generation:
            return self._cache
        with self._catch_up_lock, self._errors():
            if self._cache.generation < generation:
                self._cache = self._catch_up(self._cache)
            return self._cache

    # -- writing: one transaction each ----------------------------------------------------------

    def put_file(
        self,
        file: StoredFile,
        chunks: Sequence[Chunk],
        vectors: np.ndarray,
        embedder: str,
        original: bytes | None = None,
    ) -> None:
        """Add a file's chunks (and its uploaded bytes), replacing any file of the same name."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(chunks) or len(chunks) != file.chunks:
            raise ValueError("one vector per chunk, and file.chunks chunks")
        with self._writing() as (conn, base):
            self._check_vectors(base, embedder, vectors.shape[1])
            self._delete_file(conn, file.name)
            self._insert_file(conn, FileImport(file, chunks, vectors, original))
            conn.execute(
                update(bases)
                .where(bases.c.id == self._base_id)
                .values(embedder=embedder, dim=vectors.shape[1])
            )
        self.sync()

    def remove_file(self, name: str) -> StoredFile | None:
        with self._writing() as (conn, _):
            removed = self._delete_file(conn, name)
            if removed is not None and not self._has_chunks(conn):
                conn.execute(update(bases).where(bases.c.id == self._base_id).values(embedder=None, dim=None))
        self.sync()
        return removed

    def import_files(self, items: Sequence[FileImport], embedder: str | None, source: str) -> bool:
        """Fill an empty base never migrated before with `items` (a migration); False if it was not."""
        with self._writing() as (conn, base):
            has_files = conn.execute(
                select(func.count()).where(files.c.base_id == self._base_id)
            ).scalar_one()
            if base.migrated_from is not None or has_files:
                return False
            dim = items[0].vectors.shape[1] if items else None
            for item in items:
                self._insert_file(conn, item)
            values = {"migrated_from": source, "embedder": embedder if items else None, "dim": dim}
            conn.execute(update(bases).where(bases.c.id == self._base_id).values(**values))
        self.sync()
        return True

    # -- internals ------------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[tuple[Connection, Any]]:
        """A write transaction holding the base row (PostgreSQL) or the database (SQLite)."""
        with self._errors(), self.engine.connect() as conn:
            conn.execution_options(kb_write=True)
            with conn.begin():
                base = conn.execute(
                    update(bases)
                    .where(bases.c.id == self._base_id)
                    .values(generation=bases.c.generation + 1)
                    .returning(bases.c.generation, bases.c.embedder, bases.c.dim, bases.c.migrated_from)
                ).one()
                yield conn, base

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A full database is a full disk (OSError, ENOSPC); one out of reach, or locked, is a 503."""
        try:
            yield
        except DBAPIError as exc:
            if _is_disk_full(exc):
                raise OSError(
                    errno.ENOSPC, f"No space left for the knowledge base's database ({exc.orig})"
                ) from exc
            if isinstance(exc, OperationalError | InterfaceError):
                log.error("knowledge base %s: database %s: %s", self.name, self.url, exc.orig)
                raise StoreUnavailable(
                    f"the knowledge base's database cannot be used now ({type(exc.orig).__name__}); "
                    "try again shortly"
                ) from exc
            raise

    def _check_vectors(self, base: Any, embedder: str, dim: int) -> None:
        if base.embedder is not None and base.embedder != embedder:
            raise EmbedderMismatch(f"the store holds {base.embedder} vectors, not {embedder}")
        if base.dim is not None and base.dim != dim:
            raise EmbedderMismatch(f"the store holds {base.dim}-d vectors, not {dim}-d")

    def _has_chunks(self, conn: Connection) -> bool:
        query = (
            select(chunks.c.id)
            .join(files, files.c.id == chunks.c.file_id)
            .where(files.c.base_id == self._base_id)
        )
        return conn.execute(query.limit(1)).first() is not None

    def _delete_file(self, conn: Connection, name: str) -> StoredFile | None:
        row = conn.execute(
            select(files).where(files.c.base_id == self._base_id, files.c.name == name)
        ).one_or_none()
        if row is None:
            return None
        for table in (chunks, originals):  # explicit: not every database enforces the cascade
            conn.execute(delete(table).where(table.c.file_id == row.id))
        conn.execute(delete(files).where(files.c.id == row.id))
        return _stored_file(row)

    def _insert_file(self, conn: Connection, item: FileImport) -> None:
        f = item.file
        values = {
            "base_id": self._base_id,
            "name": f.name,
            "kind": f.kind,
            "size": f.size,
            "chunks": f.chunks,
            "pages": f.pages,
            "added_at": f.added_at,
            "sha256": f.sha256,
        }
        file_id = conn.execute(insert(files).values(**values).returning(files.c.id)).scalar_one()
        if item.original is not None:
            conn.execute(insert(originals).values(file_id=file_id, data=item.original))
        vectors = np.ascontiguousarray(item.vectors, dtype=np.float32)
        rows = [
            {
                "file_id": file_id,
                "seq": seq,
                "content": c.content,
                "page": c.page,
                "heading": c.heading,
                "vector": vectors[seq].tobytes(),
            }
            for seq, c in enumerate(item.chunks)
        ]
        if rows:
            conn.execute(insert(chunks), rows)

    def _create_schema(self) -> None:
        with self.engine.connect() as conn:
            conn.execution_options(kb_write=True)
            with conn.begin():
                if self._postgres:  # two replicas starting at once must not both CREATE TABLE
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                metadata.create_all(conn)

    def _base_row_id(self) -> int:
        query = select(bases.c.id).where(bases.c.name == self.name)
        for _ in range(2):  # the second pass finds the row another replica inserted meanwhile
            with self.engine.begin() as conn:
                found = conn.execute(query).scalar_one_or_none()
                if found is not None:
                    return int(found)
            try:
                with self.engine.begin() as conn:
                    return int(
                        conn.execute(
                            insert(bases).values(name=self.name, generation=0).returning(bases.c.id)
                        ).scalar_one()
                    )
            except IntegrityError:
                continue
        raise RuntimeError(f"knowledge base {self.name}: no row in kb_bases")

    def _catch_up(self, cache: _Cache) -> _Cache:
        with self._snapshot() as conn:
            base = conn.execute(select(bases).where(bases.c.id == self._base_id)).one()
            file_rows = conn.execute(select(files).where(files.c.base_id == self._base_id)).all()
            ids = np.asarray(
                conn.execute(
                    select(chunks.c.id)
                    .join(files, files.c.id == chunks.c.file_id)
                    .where(files.c.base_id == self._base_id)
                    .order_by(chunks.c.id)
                )
                .scalars()
                .all(),
                dtype=np.int64,
            )
            old_rows, kept = _rows_of(cache.ids, ids)
            missing = ids[~kept].tolist()
            fetched: list[Row[Any]] = []
            for start in range(0, len(missing), FETCH_BATCH):
                batch = missing[start : start + FETCH_BATCH]
                fetched += conn.execute(
                    select(chunks).where(chunks.c.id.in_(batch)).order_by(chunks.c.id)
                ).all()
        names = {r.id: r.name for r in file_rows}
        vectors = np.empty((len(ids), base.dim or 0), dtype=np.float32)
        if kept.any():
            vectors[kept] = cache.vectors[old_rows[kept]]
        old = cache.chunks
        pairs = zip(old_rows.tolist(), kept.tolist(), strict=True)
        for row, r in zip(np.flatnonzero(~kept), fetched, strict=True):
            vectors[row] = np.frombuffer(r.vector, dtype=np.float32)
        new = iter([Chunk(names[r.file_id], r.content, r.page, r.heading) for r in fetched])
        chunk_list = [old[i] if k else next(new) for i, k in pairs]  # fetched in the order of the rows
        index = None
        if len(ids):
            index = self._faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
        log.debug(
            "knowledge base %s: generation %d, %d chunks fetched", self.name, base.generation, len(missing)
        )
        stored = {r.name: _stored_file(r) for r in file_rows}
        embedder = base.embedder if len(ids) else None
        self._keywords.remove(cache.ids[~np.isin(cache.ids, ids)].tolist())
        self._keywords.add((int(ids[row]), chunk_list[row].embedding_text()) for row in np.flatnonzero(~kept))
        return _Cache(base.generation, stored, ids, chunk_list, vectors, index, embedder)

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read-only transaction that sees one committed state throughout."""
        with self.engine.connect() as conn:
            if self._postgres:
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn


def _rows_of(old_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `ids` its row among `old_ids` (ascending), and whether it is there."""
    if not len(old_ids):
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    rows = np.minimum(np.searchsorted(old_ids, ids), len(old_ids) - 1)
    return rows, old_ids[rows] == ids


def _stored_file(row: Any) -> StoredFile:
    return StoredFile(row.name, row.kind, row.size, row.chunks, row.pages, row.added_at, row.sha256)


def _is_disk_full(exc: DBAPIError) -> bool:
    orig = exc.orig
    return "database or disk is full" in str(orig) or getattr(orig, "sqlstate", None) == "53100"
