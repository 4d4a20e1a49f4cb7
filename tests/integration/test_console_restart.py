"""A console that restarts finds its services in the database: it reattaches replicas that survived
a crash (same PIDs), and starts again the ones it stopped on a clean exit."""

import os
import signal
from pathlib import Path

import pytest

from tests.integration.test_console import (
    FAKE,
    alive,
    call,
    kill_leftovers,
    replica_pids,
    start_console,
    stop_console,
)
from tests.servers import free_port

pytestmark = pytest.mark.integration


def test_console_restarts_reattach_or_restart_replicas(tmp_path: Path) -> None:
    port = free_port()
    console = start_console(tmp_path, port)
    try:
        service = console.deploy("survivor", *FAKE, "--replicas", "2")
        endpoint, token = service["invocation"]["endpoint"], service["token"]
        pids = sorted(i["pid"] for i in service["instances"])

        stop_console(console, signal.SIGKILL)  # a crash: the replicas run on
        assert all(alive(pid) for pid in pids)
        console = start_console(tmp_path, port)
        service = console.wait_for("survivor", lambda s: s["replicas"]["ready"] == 2, timeout=30)
        assert sorted(i["pid"] for i in service["instances"]) == pids, "the same processes, reattached"
        assert [e["kind"] for e in service["events"]].count("reattach") == 2
        assert call(endpoint, token, "still here").json()["response"].startswith("You said: still here.")

        stop_console(console)  # a clean exit stops the replicas
        assert not any(alive(pid) for pid in pids) and replica_pids(tmp_path) == []
        console = start_console(tmp_path, port)
        service = console.wait_for("survivor", lambda s: s["replicas"]["ready"] == 2, timeout=60)
        new_pids = sorted(i["pid"] for i in service["instances"])
        assert not set(new_pids) & set(pids) and all(alive(pid) for pid in new_pids)
        assert [e["kind"] for e in service["events"]].count("restart") == 2
        assert service["token"] == token and service["version"] == 1
        assert call(endpoint, token, "back again").json()["response"].startswith("You said: back again.")

        assert console.cli("stop", "survivor").returncode == 0
        stop_console(console)
        console = start_console(tmp_path, port)
        service = console.describe("survivor")
        assert service["status"] == "stopped" and service["instances"] == [], "stopped stays stopped"
    finally:
        stop_console(console)
        kill_leftovers(tmp_path)


def test_keep_replicas_leaves_them_running_for_the_next_console(tmp_path: Path) -> None:
    port = free_port()
    console = start_console(tmp_path, port, "--keep-replicas")
    pid = 0
    try:
        pid = console.deploy("kept", *FAKE)["instances"][0]["pid"]
        stop_console(console)
        assert alive(pid)
        console = start_console(tmp_path, port)
        service = console.wait_for("kept", lambda s: s["replicas"]["ready"] == 1, timeout=30)
        assert service["instances"][0]["pid"] == pid
        stop_console(console)  # this one was started without --keep-replicas
        assert not alive(pid)
    finally:
        stop_console(console)
        kill_leftovers(tmp_path)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
