"""The console's registry on SQLite (these same tests run on PostgreSQL in test_console_postgres.py)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from easllm.control.registry import Base, NameTaken, Registry, UnknownService
from easllm.control.spec import ServiceSpec, parse_spec


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(f"sqlite:///{tmp_path / 'console.db'}")
    yield reg
    reg.close()


def spec(name: str = "llm_demo001", **fields: object) -> ServiceSpec:
    return parse_spec({"name": name, "engine": "fake", **fields}).with_token()


def test_migration_creates_the_schema_of_the_models(registry: Registry) -> None:
    tables = set(inspect(registry.engine).get_table_names())
    assert {"services", "service_versions", "replicas", "events", "alembic_version"} <= tables
    with registry.engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar() == "0001"
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
        )
    assert diff == [], "the models and the migrations disagree: add a migration"


def test_upgrading_again_keeps_the_data(registry: Registry) -> None:
    registry.create_service(spec())
    again = Registry(registry.engine.url.render_as_string(hide_password=False))
    assert [s.name for s in again.services()] == ["llm_demo001"]
    again.close()


def test_create_get_and_list(registry: Registry) -> None:
    created = registry.create_service(spec("b_svc"))
    registry.create_service(spec("a_svc"))
    assert created.desired == "running" and created.status == "deploying" and created.current_version == 1
    assert registry.get("b_svc").token == created.token and created.created_at.tzinfo is not None
    assert [s.name for s in registry.services()] == ["a_svc", "b_svc"]
    assert registry.spec("b_svc") == spec("b_svc").model_copy(update={"token": created.token})


def test_names_are_unique(registry: Registry) -> None:
    registry.create_service(spec())
    with pytest.raises(NameTaken):
        registry.create_service(spec())


def test_unknown_services_raise(registry: Registry) -> None:
    for call in (
        lambda: registry.get("nope"),
        lambda: registry.versions("nope"),
        lambda: registry.events("nope"),
    ):
        with pytest.raises(UnknownService):
            call()


def test_every_update_is_a_new_version(registry: Registry) -> None:
    first = spec()
    registry.create_service(first)
    second = first.model_copy(update={"replicas": 2})
    third = first.model_copy(update={"model": "gemma3-270m"})
    assert registry.add_version("llm_demo001", second) == 2
    assert registry.add_version("llm_demo001", third) == 3
    registry.set_version_status("llm_demo001", 1, "superseded")
    registry.update_service("llm_demo001", current_version=3)
    versions = registry.versions("llm_demo001")
    assert [(v.version, v.status, v.spec.replicas, v.spec.model) for v in versions] == [
        (1, "superseded", 1, "qwen2.5-0.5b-instruct"),
        (2, "pending", 2, "qwen2.5-0.5b-instruct"),
        (3, "pending", 1, "gemma3-270m"),
    ]
    assert (
        registry.spec("llm_demo001").model == "gemma3-270m" and registry.spec("llm_demo001", 2).replicas == 2
    )


def test_service_fields_can_be_set_but_not_others(registry: Registry) -> None:
    registry.create_service(spec())
    updated = registry.update_service("llm_demo001", desired="stopped", status="stopped")
    assert (updated.desired, updated.status) == ("stopped", "stopped")
    with pytest.raises(ValueError, match="cannot set"):
        registry.update_service("llm_demo001", created_at=None)


def test_replicas_are_recorded_and_updated(registry: Registry) -> None:
    registry.create_service(spec())
    one = registry.add_replica("llm_demo001", 1, 41000, "/tmp/replica-1.log")
    two = registry.add_replica("llm_demo001", 1, 41001, "/tmp/replica-2.log")
    registry.update_replica(one.id, pid=1234, pid_started="999", status="ready", restarts=2)
    rows = registry.replicas("llm_demo001")
    assert [(r.id, r.pid, r.status, r.restarts) for r in rows] == [
        (one.id, 1234, "ready", 2),
        (two.id, None, "starting", 0),
    ]
    registry.remove_replica(two.id)
    assert [r.id for r in registry.replicas("llm_demo001")] == [one.id]
    with pytest.raises(ValueError, match="cannot set"):
        registry.update_replica(one.id, service_id=5)
    with pytest.raises(LookupError):
        registry.update_replica(99999, status="ready")


def test_events_come_oldest_first_and_limited(registry: Registry) -> None:
    registry.create_service(spec())
    for i in range(5):
        registry.add_event("llm_demo001", "note", f"event {i}")
    events = registry.events("llm_demo001", limit=3)
    assert [e.message for e in events] == ["event 2", "event 3", "event 4"]
    assert registry.events("llm_demo001")[0].kind == "deploy"


def test_delete_removes_versions_replicas_and_events(registry: Registry) -> None:
    registry.create_service(spec())
    registry.create_service(spec("other"))
    registry.add_version("llm_demo001", spec())
    registry.add_replica("llm_demo001", 1, 41000, "/tmp/r.log")
    registry.delete_service("llm_demo001")
    with pytest.raises(UnknownService):
        registry.get("llm_demo001")
    with registry.engine.connect() as connection:
        counts = [
            connection.execute(text(f"select count(*) from {t}")).scalar()
            for t in ("service_versions", "replicas", "events")
        ]
    assert counts == [1, 0, 1], "only the other service's version and deploy event remain"
    registry.create_service(spec())  # the name is free again
