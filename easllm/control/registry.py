"""The console's database (SQLAlchemy 2): services, their versions, replicas and events.

SQLite file by default (WAL, so readers never wait for the supervisor's writes), PostgreSQL by URL.
The schema is created and upgraded by Alembic at start (`migrations/`). Callers get plain frozen
records, never ORM objects, so nothing lazy-loads after its session has closed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from easllm.control.spec import ServiceSpec
from easllm.private_files import private_file

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    """SQLite forgets time zones; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ServiceRow(Base):
    __tablename__ = "services"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    token: Mapped[str] = mapped_column(String(256))
    desired: Mapped[str] = mapped_column(String(16))  # running | stopped
    status: Mapped[str] = mapped_column(String(16))  # deploying running updating degraded stopped failed
    current_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class VersionRow(Base):
    __tablename__ = "service_versions"
    __table_args__ = (UniqueConstraint("service_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[str] = mapped_column(Text)  # ServiceSpec JSON, token included
    status: Mapped[str] = mapped_column(String(16))  # pending active superseded failed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ReplicaRow(Base):
    __tablename__ = "replicas"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    port: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_started: Mapped[str | None] = mapped_column(String(32), nullable=True)  # tells PID reuse apart
    status: Mapped[str] = mapped_column(String(16))  # starting ready unhealthy crashed draining failed
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class ServiceRecord:
    name: str
    token: str
    desired: str
    status: str
    current_version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    version: int
    spec: ServiceSpec
    status: str
    created_at: datetime


@dataclass(frozen=True)
class ReplicaRecord:
    id: int
    version: int
    port: int
    pid: int | None
    pid_started: str | None
    status: str
    restarts: int
    exit_code: int | None
    log_path: str
    started_at: datetime


@dataclass(frozen=True)
class EventRecord:
    at: datetime
    kind: str
    message: str


class NameTaken(ValueError):
    """A service with this name exists already."""


class UnknownService(LookupError):
    """No service with this name."""


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'console.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def upgrade_schema(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (Alembic, run in-process)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Registry:
    def __init__(self, url: str, migrate: bool = True) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            # every service token is in it: 0600 before SQLite opens it (its WAL files copy the mode)
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            private_file(Path(parsed.database))
        self.engine = create_engine(url, pool_pre_ping=True)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if migrate:
            upgrade_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.url = parsed.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _service(self, session: Session, name: str) -> ServiceRow:
        row = session.scalars(select(ServiceRow).where(ServiceRow.name == name)).one_or_none()
        if row is None:
            raise UnknownService(name)
        return row

    # services ------------------------------------------------------------------------------------
    def create_service(self, spec: ServiceSpec, status: str = "deploying") -> ServiceRecord:
        """A new service with version 1 (pending) of `spec`, which must carry its token."""
        assert spec.token, "create_service needs a spec with a token"
        try:
            with self._session() as session:
                row = ServiceRow(
                    name=spec.name, token=spec.token, desired="running", status=status, current_version=1
                )
                session.add(row)
                session.flush()
                session.add(
                    VersionRow(service_id=row.id, version=1, spec=spec.model_dump_json(), status="pending")
                )
                session.add(EventRow(service_id=row.id, kind="deploy", message=f"version 1: {spec.model}"))
                return _service_record(row)
        except IntegrityError as exc:
            raise NameTaken(spec.name) from exc

    def get(self, name: str) -> ServiceRecord:
        with self._session() as session:
            return _service_record(self._service(session, name))

    def services(self) -> list[ServiceRecord]:
        with self._session() as session:
            return [_service_record(r) for r in session.scalars(select(ServiceRow).order_by(ServiceRow.name))]

    def update_service(self, name: str, **fields: object) -> ServiceRecord:
        """Set `desired`, `status`, `current_version` or `token`."""
        allowed = {"desired", "status", "current_version", "token"}
        if not set(fields) <= allowed:
            raise ValueError(f"cannot set {set(fields) - allowed}")
        with self._session() as session:
            row = self._service(session, name)
            for key, value in fields.items():
                setattr(row, key, value)
            session.flush()
            return _service_record(row)

    def delete_service(self, name: str) -> None:
        with self._session() as session:
            row = self._service(session, name)
            for table in (ReplicaRow, VersionRow, EventRow):  # not every database cascades
                for child in session.scalars(select(table).where(table.service_id == row.id)):
                    session.delete(child)
            session.delete(row)

    # versions ------------------------------------------------------------------------------------
    def add_version(self, name: str, spec: ServiceSpec) -> int:
        """Record the next version (pending) of a service; returns its number."""
        with self._session() as session:
            row = self._service(session, name)
            last = session.scalars(
                select(VersionRow.version)
                .where(VersionRow.service_id == row.id)
                .order_by(VersionRow.version.desc())
            ).first()
            number = (last or 0) + 1
            session.add(
                VersionRow(service_id=row.id, version=number, spec=spec.model_dump_json(), status="pending")
            )
            return number

    def set_version_status(self, name: str, version: int, status: str) -> None:
        with self._session() as session:
            row = self._service(session, name)
            version_row = session.scalars(
                select(VersionRow).where(VersionRow.service_id == row.id, VersionRow.version == version)
            ).one()
            version_row.status = status

    def versions(self, name: str) -> list[VersionRecord]:
        with self._session() as session:
            row = self._service(session, name)
            rows = session.scalars(
                select(VersionRow).where(VersionRow.service_id == row.id).order_by(VersionRow.version)
            )
            return [
                VersionRecord(
                    v.version, ServiceSpec.model_validate_json(v.spec), v.status, _utc(v.created_at)
                )
                for v in rows
            ]

    def spec(self, name: str, version: int | None = None) -> ServiceSpec:
        """The spec of `version` (default: the current one)."""
        with self._session() as session:
            row = self._service(session, name)
            wanted = row.current_version if version is None else version
            text = session.scalars(
                select(VersionRow.spec).where(VersionRow.service_id == row.id, VersionRow.version == wanted)
            ).one()
            return ServiceSpec.model_validate_json(text)

    # replicas ------------------------------------------------------------------------------------
    def add_replica(self, name: str, version: int, port: int, log_path: str) -> ReplicaRecord:
        with self._session() as session:
            row = self._service(session, name)
            replica = ReplicaRow(
                service_id=row.id,
                version=version,
                port=port,
                status="starting",
                restarts=0,
                log_path=log_path,
            )
            session.add(replica)
            session.flush()
            return _replica_record(replica)

    def update_replica(self, replica_id: int, **fields: object) -> ReplicaRecord:
        with self._session() as session:
            replica = session.get(ReplicaRow, replica_id)
            if replica is None:
                raise LookupError(f"no replica {replica_id}")
            for key, value in fields.items():
                if key not in ReplicaRecord.__dataclass_fields__ or key == "id":
                    raise ValueError(f"cannot set replica field {key}")
                setattr(replica, key, value)
            session.flush()
            return _replica_record(replica)

    def remove_replica(self, replica_id: int) -> None:
        with self._session() as session:
            replica = session.get(ReplicaRow, replica_id)
            if replica is not None:
                session.delete(replica)

    def replicas(self, name: str) -> list[ReplicaRecord]:
        with self._session() as session:
            row = self._service(session, name)
            rows = session.scalars(
                select(ReplicaRow).where(ReplicaRow.service_id == row.id).order_by(ReplicaRow.id)
            )
            return [_replica_record(r) for r in rows]

    # events --------------------------------------------------------------------------------------
    def add_event(self, name: str, kind: str, message: str) -> None:
        with self._session() as session:
            row = self._service(session, name)
            session.add(EventRow(service_id=row.id, kind=kind, message=message))
        log.info("%s: %s: %s", name, kind, message)

    def events(self, name: str, limit: int = 50) -> list[EventRecord]:
        """The newest `limit` events, oldest first."""
        with self._session() as session:
            row = self._service(session, name)
            rows = session.scalars(
                select(EventRow)
                .where(EventRow.service_id == row.id)
                .order_by(EventRow.id.desc())
                .limit(limit)
            )
            return [EventRecord(_utc(e.at), e.kind, e.message) for e in reversed(list(rows))]


def _service_record(row: ServiceRow) -> ServiceRecord:
    return ServiceRecord(
        row.name,
        row.token,
        row.desired,
        row.status,
        row.current_version,
        _utc(row.created_at),
        _utc(row.updated_at),
    )


def _replica_record(r: ReplicaRow) -> ReplicaRecord:
    return ReplicaRecord(
        r.id,
        r.version,
        r.port,
        r.pid,
        r.pid_started,
        r.status,
        r.restarts,
        r.exit_code,
        r.log_path,
        _utc(r.started_at),
    )
