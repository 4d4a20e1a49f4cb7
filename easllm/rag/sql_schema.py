"""The knowledge base's tables and the database engine they live in (SQLAlchemy 2 Core).

`kb_bases` has one row per knowledge base (a service): its generation counter, moved by every
write, and the embedder of its vectors. `kb_files`, `kb_originals` (the uploaded bytes) and
`kb_chunks` (text and float32 vector) hang off it. The `kb_` prefix lets the tables share a
database with the console's registry; rows keyed by base let several services share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

from easllm.private_files import private_file

metadata = MetaData()
bases = Table(
    "kb_bases",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("generation", BigInteger, nullable=False, default=0),
    Column("embedder", String(500)),  # None while the base holds no chunk
    Column("dim", Integer),
    Column("migrated_from", Text),  # the FaissStore folder imported on first start, if any
)
files = Table(
    "kb_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("base_id", ForeignKey("kb_bases.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(512), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("pages", Integer),
    Column("added_at", Float, nullable=False),
    Column("sha256", String(64), nullable=False),
    UniqueConstraint("base_id", "name"),
)
originals = Table(
    "kb_originals",
    metadata,
    Column("file_id", ForeignKey("kb_files.id", ondelete="CASCADE"), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)
chunks = Table(
    "kb_chunks",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("file_id", ForeignKey("kb_files.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("seq", Integer, nullable=False),  # position in its file
    Column("content", Text, nullable=False),
    Column("page", Integer),
    Column("heading", Text),
    Column("vector", LargeBinary, nullable=False),  # float32, L2-normalised
    sqlite_autoincrement=True,  # ids are never reused: a cache compares id sets
)


MAX_URL_CHARS = 2048
BACKENDS = ("sqlite", "postgresql")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def check_database_url(url: str) -> str:
    """`url` if it names a database this store supports; else ValueError saying why."""
    from sqlalchemy.exc import ArgumentError

    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"the database URL is {len(url)} characters; the limit is {MAX_URL_CHARS}")
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise ValueError(
            f"not a database URL: {url[:80]!r} (e.g. postgresql+psycopg://user@host/db)"
        ) from None
    if backend not in BACKENDS:
        raise ValueError(f"the knowledge base supports {' and '.join(BACKENDS)} databases, not {backend}")
    return url


def open_engine(url: str) -> Engine:
    """An engine whose transactions are real snapshots on SQLite too (WAL, BEGIN at first use)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database not in (None, "", ":memory:"):
        # every uploaded document is in it: 0600 before SQLite opens it (its WAL files copy the mode)
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        private_file(Path(parsed.database))
    engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite opens transactions only before writes, so reads would not share one snapshot;
    # SQLAlchemy's documented recipe: let the driver autocommit and emit BEGIN ourselves.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # The busy timeout first: switching a fresh database to WAL takes a lock that replicas opening it at
    # the same moment must wait for, not fail on ("database is locked").
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A writer takes the write lock at BEGIN: a deferred one could fail to upgrade (SQLITE_BUSY).
    writing = connection.get_execution_options().get("kb_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")
