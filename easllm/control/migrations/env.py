"""Alembic environment: runs on the connection `registry.upgrade_schema` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from easllm.control.registry import Base


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:  # the `alembic` command line: a URL in alembic.ini or -x url=...
        url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
            "sqlalchemy.url"
        )
        if not url:
            raise SystemExit("alembic: give the database as -x url=... (or sqlalchemy.url in alembic.ini)")
        with create_engine(url).begin() as own:
            _run(own)
        return
    _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
