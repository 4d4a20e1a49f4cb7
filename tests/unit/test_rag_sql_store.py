"""SqlStore: the knowledge base as database rows shared by replicas (two store objects on one
database stand for two replicas), one transaction per write, a FAISS cache caught up per question,
a crash mid-transaction, and the migration of a FaissStore folder of earlier versions.

`kb_url` is SQLite here; tests/integration/test_knowledge_postgres.py runs them on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event

from easllm.rag.migrate import migrate_faiss_folder
from easllm.rag.splitter import Chunk
from easllm.rag.sql_schema import check_database_url, sqlite_url
from easllm.rag.sql_store import EmbedderMismatch, SqlStore
from easllm.rag.store import FaissStore, StoredFile, write_atomic


@pytest.fixture
def kb_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "knowledge.db")


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def record(name: str, n: int, sha: str | None = None) -> StoredFile:
    return StoredFile(name, "txt", 10, n, None, 1.0, sha or f"sha-{name}")


def put(store: SqlStore | FaissStore, name: str, vectors: list[np.ndarray], embedder: str = "e") -> None:
    chunks = [Chunk(name, f"{name} chunk {i}", page=i + 1) for i in range(len(vectors))]
    original = f"bytes of {name}".encode()
    if isinstance(store, FaissStore):
        store.put_file(record(name, len(chunks)), chunks, np.stack(vectors), embedder)
    else:
        store.put_file(record(name, len(chunks)), chunks, np.stack(vectors), embedder, original=original)


def names(store: SqlStore) -> list[str]:
    return [f.name for f in store.files()]


def test_search_ranks_by_cosine_and_keeps_pages(kb_url: str) -> None:
    store = SqlStore(kb_url, "svc")
    put(store, "a.txt", [unit(1, 0, 0), unit(0, 1, 0)])
    put(store, "b.txt", [unit(1, 1, 0)])
    hits = store.search(unit(1, 0.1, 0), 3)
    assert [h.chunk.content for h in hits] == ["a.txt chunk 0", "b.txt chunk 0", "a.txt chunk 1"]
    assert hits[0].score == pytest.approx(float(unit(1, 0.1, 0) @ unit(1, 0, 0)), abs=1e-5)
    assert hits[0].chunk.page == 1 and hits[0].chunk.source == "a.txt"
    assert store.original("b.txt") == b"bytes of b.txt" and store.original("nope.txt") is None


def test_same_name_replaces_and_remove_then_reopen_keeps_the_rest(kb_url: str) -> None:
    store = SqlStore(kb_url, "svc")
    put(store, "a.txt", [unit(1, 0, 0), unit(0, 1, 0)])
    put(store, "b.txt", [unit(0, 1, 0), unit(0, 1, 1)])
    put(store, "a.txt", [unit(1, 0, 1)])
    assert store.chunk_count() == 3 and [f.chunks for f in store.files()] == [1, 2]
    removed = store.remove_file("a.txt")
    assert removed is not None and removed.name == "a.txt" and store.remove_file("a.txt") is None
    reopened = SqlStore(kb_url, "svc")
    assert names(reopened) == ["b.txt"] and reopened.embedder == "e"
    assert [h.chunk.source for h in reopened.search(unit(1, 0, 0), 5)] == ["b.txt", "b.txt"]
    assert reopened.original("a.txt") is None


def test_removing_the_last_file_empties_the_base_and_frees_the_embedder(kb_url: str) -> None:
    store = SqlStore(kb_url, "svc")
    put(store, "a.txt", [unit(1, 0)], embedder="e5")
    with pytest.raises(EmbedderMismatch, match="e5"):
        put(store, "b.txt", [unit(0, 1)], embedder="minilm")
    with pytest.raises(EmbedderMismatch, match="2-d"):
        put(store, "b.txt", [unit(0, 1, 0)], embedder="e5")
    store.remove_file("a.txt")
    assert store.chunk_count() == 0 and store.embedder is None and store.search(unit(1, 0), 3) == []
    put(store, "c.txt", [unit(0, 1, 0)], embedder="minilm")  # an empty base takes any embedder
    assert SqlStore(kb_url, "svc").embedder == "minilm"


def test_a_write_through_one_replica_is_seen_by_the_other_at_once(kb_url: str) -> None:
    one, two = SqlStore(kb_url, "svc"), SqlStore(kb_url, "svc")
    put(one, "a.txt", [unit(1, 0)])
    assert names(two) == ["a.txt"] and two.search(unit(1, 0), 1)[0].chunk.content == "a.txt chunk 0"
    put(two, "b.txt", [unit(0, 1)])
    assert [h.chunk.source for h in one.search(unit(0, 1), 2)] == ["b.txt", "a.txt"]
    put(one, "b.txt", [unit(1, 1)])  # a replacement through the other replica
    assert two.chunk_count() == 2 and two.search(unit(0, 1), 1)[0].score < 0.99
    assert one.remove_file("a.txt") is not None
    assert names(two) == ["b.txt"] and [h.chunk.source for h in two.search(unit(1, 0), 5)] == ["b.txt"]
    assert one.generation == two.generation


def test_the_keyword_index_is_fed_from_the_rows_like_faiss(kb_url: str) -> None:
    one, two = SqlStore(kb_url, "svc"), SqlStore(kb_url, "svc")
    chunks = [Chunk("ja.txt", "デプロイは約5分かかります。"), Chunk("ja.txt", "料金は無料です。")]
    one.put_file(record("ja.txt", 2), chunks, np.stack([unit(1, 0), unit(0, 1)]), "e")
    [hit] = two.keyword_search("デプロイ時間", 5)  # fed by the other replica's write, at once
    assert hit.chunk == chunks[0] and hit.id is not None and hit.score > 0
    assert [h.id for h in two.search(unit(1, 0), 1)] == [hit.id]  # one id for both rankings
    assert two.similarities(unit(0, 1), [hit.id]) == pytest.approx([0.0], abs=1e-6)
    put(one, "en.txt", [unit(1, 1)])
    assert [h.chunk.source for h in two.keyword_search("en.txt chunk", 5)] == ["en.txt"]
    one.remove_file("ja.txt")
    assert two.keyword_search("デプロイ", 5) == [] and two.similarities(unit(1, 0), [hit.id]) == [-1.0]
    ids = [h.id for h in two.search(unit(1, 1), 1)]
    assert SqlStore(kb_url, "svc").keyword_search("en.txt", 5)[0].id == ids[0]  # the same on a restart


def test_catching_up_fetches_only_the_new_rows(kb_url: str) -> None:
    one, two = SqlStore(kb_url, "svc"), SqlStore(kb_url, "svc")
    put(one, "big.txt", [unit(1, i / 10) for i in range(20)])
    assert two.chunk_count() == 20
    statements: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, parameters: object, *_: object) -> None:
        if not statement.startswith("BEGIN"):
            statements.append((statement, parameters))

    event.listen(two.engine, "before_cursor_execute", seen)
    assert two.search(unit(1, 0), 1)  # nothing changed: one read of the generation
    assert len(statements) == 1 and "kb_bases" in statements[0][0]
    statements.clear()
    put(one, "small.txt", [unit(0, 1)])
    assert two.search(unit(0, 1), 1)[0].chunk.source == "small.txt"
    fetches = [params for sql, params in statements if "kb_chunks.vector" in sql]
    assert len(fetches) == 1 and len(fetches[0]) == 1, statements  # one row asked for: the new one


def test_concurrent_puts_of_different_files_through_two_replicas_all_survive(kb_url: str) -> None:
    stores = [SqlStore(kb_url, "svc"), SqlStore(kb_url, "svc")]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        start.wait()
        try:
            put(stores[i % 2], f"f{i}.txt", [unit(1, i), unit(i, 1)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    expected = [f"f{i}.txt" for i in range(8)]
    for store in stores:
        assert names(store) == expected and store.chunk_count() == 16


def test_replicas_starting_at_once_on_a_fresh_database_make_one_schema_and_one_base(kb_url: str) -> None:
    start = threading.Barrier(4)
    stores: list[SqlStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            stores.append(SqlStore(kb_url, "svc"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4
    put(stores[0], "a.txt", [unit(1, 0)])
    assert all(names(s) == ["a.txt"] for s in stores)


def test_two_services_in_one_database_are_separate(kb_url: str) -> None:
    put(SqlStore(kb_url, "alpha"), "a.txt", [unit(1, 0)])
    beta = SqlStore(kb_url, "beta")
    assert beta.files() == [] and beta.search(unit(1, 0), 3) == []
    put(beta, "a.txt", [unit(0, 1, 0)], embedder="other")
    assert SqlStore(kb_url, "alpha").search(unit(1, 0), 3)[0].chunk.content == "a.txt chunk 0"


def test_an_error_inside_the_transaction_leaves_the_last_commit(
    kb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, other = SqlStore(kb_url, "svc"), SqlStore(kb_url, "svc")
    put(store, "a.txt", [unit(1, 0)])
    real = SqlStore._insert_file

    def half_then_fail(self: SqlStore, conn: object, item: object) -> None:
        real(self, conn, item)  # the file, its original and its chunks are written, then:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SqlStore, "_insert_file", half_then_fail)
    with pytest.raises(OSError):
        put(store, "a.txt", [unit(0, 1), unit(1, 1)])
    monkeypatch.undo()
    for s in (store, other, SqlStore(kb_url, "svc")):
        assert names(s) == ["a.txt"] and s.chunk_count() == 1 and s.original("a.txt") == b"bytes of a.txt"


CRASH = """
import os, signal, sys
import numpy as np
from easllm.rag.sql_store import SqlStore
from tests.unit.test_rag_sql_store import put, unit
store = SqlStore(sys.argv[1], "svc")
put(store, "kept.txt", [unit(1, 0)])
real = SqlStore._insert_file
def dies(self, conn, item):
    real(self, conn, item)
    print("mid-transaction", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
SqlStore._insert_file = dies
put(store, "lost.txt", [unit(0, 1)])
"""


def test_a_process_killed_mid_transaction_leaves_the_last_committed_state(kb_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, kb_url], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == -9 and "mid-transaction" in done.stdout, done.stderr
    store = SqlStore(kb_url, "svc")
    assert names(store) == ["kept.txt"] and store.chunk_count() == 1
    assert [h.chunk.source for h in store.search(unit(0, 1), 5)] == ["kept.txt"]
    put(store, "after.txt", [unit(0, 1)])  # the database is not left locked
    assert names(store) == ["after.txt", "kept.txt"]


def old_knowledge_folder(root: Path) -> None:
    """A knowledge base as earlier versions left it: FaissStore generations and originals."""
    old = FaissStore(root / "index")
    put(old, "a.txt", [unit(1, 0, 0), unit(0, 1, 0)], embedder="e5")
    put(old, "b.txt", [unit(0, 0, 1)], embedder="e5")
    for f in old.files():
        write_atomic(root / "files" / f.sha256[:16] / f.name, f"bytes of {f.name}".encode())


def test_an_old_faiss_folder_moves_into_the_database_once(tmp_path: Path, kb_url: str) -> None:
    old_knowledge_folder(tmp_path)
    store = SqlStore(kb_url, "svc")
    assert migrate_faiss_folder(store, tmp_path) == 2
    other = SqlStore(kb_url, "svc")
    assert names(other) == ["a.txt", "b.txt"] and other.embedder == "e5" and other.chunk_count() == 3
    hits = other.search(unit(0, 1, 0), 1)
    assert hits[0].chunk == Chunk("a.txt", "a.txt chunk 1", 2) and hits[0].score == pytest.approx(1, abs=1e-5)
    assert other.original("b.txt") == b"bytes of b.txt"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["files.migrated", "index.migrated"]

    old_knowledge_folder(tmp_path / "again")  # an old folder found later is not merged in
    other.remove_file("a.txt")
    assert migrate_faiss_folder(other, tmp_path / "again") == 0 and names(other) == ["b.txt"]
    assert (tmp_path / "again" / "index" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mysql://u@h/db", "not mysql"),
        ("not a url", "not a database URL"),
        ("postgresql://h/" + "x" * 3000, "the limit is 2048"),
    ],
)
def test_unsupported_database_urls_are_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_database_url(url)
    assert check_database_url("postgresql+psycopg://u@h:5432/kb").startswith("postgresql")


def test_the_sqlite_database_and_its_wal_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a loose umask would make them 0664
    try:
        store = SqlStore(sqlite_url(tmp_path / "knowledge.db"), "svc")
        put(store, "a.txt", [unit(1, 0)])
        files = sorted(tmp_path.glob("knowledge.db*"))
        assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files), files
        store.close()
    finally:
        os.umask(old)
