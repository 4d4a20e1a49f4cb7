"""The registry tests again on PostgreSQL, and a console that keeps its services there.

A throwaway PostgreSQL server (Debian's binaries; installed with apt-get when missing and this runs
as root) listens on 127.0.0.1 only, trusts local connections, and is removed afterwards.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from easllm.control.registry import Registry
from tests.integration.test_console import FAKE, alive, call, start_console, stop_console
from tests.servers import free_port
from tests.unit.test_control_registry import (  # noqa: F401  (collected here, on PostgreSQL)
    test_create_get_and_list,
    test_delete_removes_versions_replicas_and_events,
    test_events_come_oldest_first_and_limited,
    test_every_update_is_a_new_version,
    test_migration_creates_the_schema_of_the_models,
    test_names_are_unique,
    test_replicas_are_recorded_and_updated,
    test_service_fields_can_be_set_but_not_others,
    test_unknown_services_raise,
    test_upgrading_again_keeps_the_data,
)

pytestmark = pytest.mark.integration


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _install_postgres() -> str | None:
    """Install Debian's PostgreSQL; None on success, else why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "PostgreSQL server binaries are missing and this is not root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr[-500:]}"
    return None


def _runner() -> tuple[Callable[[list[str]], list[str]], int, int]:
    """PostgreSQL refuses to run as root: as root, run its tools as the postgres user."""
    if os.geteuid() != 0:
        return (lambda cmd: cmd), os.getuid(), os.getgid()
    user = pwd.getpwnam("postgres")
    return (lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]), user.pw_uid, user.pw_gid


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """URL of a fresh PostgreSQL server's `postgres` database."""
    if _pg_bin() is None and (why := _install_postgres()):
        pytest.skip(why)
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL was installed but initdb is not under /usr/lib/postgresql")
    try:
        as_owner, uid, gid = _runner()
    except KeyError:
        pytest.skip("no postgres user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="easllm-pg-"))
    os.chown(root, uid, gid)
    data, port = root / "data", free_port()
    run = lambda cmd: subprocess.run(as_owner(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    init = run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"])
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr[-500:]}")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    start = run([*pg_ctl, "-o", options, "-l", str(root / "log"), "-w", "start"])
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run([*pg_ctl, "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


_numbers = itertools.count()


@pytest.fixture
def fresh_database(postgres_server: str) -> Iterator[str]:
    import psycopg

    name = f"easllm_test_{next(_numbers)}"
    admin_url = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def registry(fresh_database: str) -> Iterator[Registry]:
    """The imported registry tests use this one: PostgreSQL instead of SQLite."""
    reg = Registry(fresh_database)
    assert reg.engine.dialect.name == "postgresql"
    yield reg
    reg.close()


def test_the_console_keeps_its_services_in_postgresql(fresh_database: str, tmp_path: Path) -> None:
    port = free_port()
    console = start_console(tmp_path, port, "--db", fresh_database)
    pid = 0
    try:
        service = console.deploy("pg_svc", *FAKE)
        pid = service["instances"][0]["pid"]
        assert not (tmp_path / "console.db").exists(), "no SQLite file when a URL is given"
        stop_console(console, signal.SIGKILL)
        console = start_console(tmp_path, port, "--db", fresh_database)
        again = console.wait_for("pg_svc", lambda s: s["replicas"]["ready"] == 1, timeout=30)
        assert (
            again["token"] == service["token"]
            and again["instances"][0]["pid"] == service["instances"][0]["pid"]
        )
        answer = call(again["invocation"]["endpoint"], again["token"], "from pg").json()["response"]
        assert answer.startswith("You said: from pg.")
        assert console.cli("delete", "pg_svc").returncode == 0
        registry = Registry(fresh_database)
        assert registry.services() == [] and not alive(pid)
        registry.close()
    finally:
        stop_console(console)
        if pid and alive(pid):  # the replica outlived a failed test
            os.kill(pid, signal.SIGKILL)
