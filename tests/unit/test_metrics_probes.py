"""`/live`, `/health` and `/ready` while loading, after a failed load, and with a stuck engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient

from easllm.app import create_app
from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import EngineHealth, GenerationRequest, ModelInfo
from easllm.server.state import state_of
from easllm.serving.observe import EngineWatch, Progress


class GatedEngine(FakeEngine):
    """Loading waits for `loaded`; each token waits for `step` (a stuck engine until it is set)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(context_length=512)
        self.loaded = threading.Event()
        self.step = threading.Event()
        self.step.set()
        self.fail = fail

    def _load(self) -> ModelInfo:
        self.loaded.wait(10)
        if self.fail:
            raise RuntimeError("weights are corrupt")
        return super()._load()

    def _generate_tokens(self, req: GenerationRequest) -> Iterator[tuple[int, str]]:
        for item in super()._generate_tokens(req):
            self.step.wait(10)
            yield item


def app_for(engine: FakeEngine, tmp_path: Path) -> TestClient:
    config = ServerConfig(token="t", data_dir=tmp_path, sampling=SamplingDefaults(max_new_tokens=4))
    return TestClient(create_app(config, engine))


def wait_for(client: TestClient, path: str, status: int) -> dict:
    deadline = time.monotonic() + 10
    while (r := client.get(path)).status_code != status:
        assert time.monotonic() < deadline, f"{path} stays {r.status_code}: {r.text}"
        time.sleep(0.02)
    return r.json()


def test_live_answers_while_loading_and_ready_waits_for_the_model(tmp_path: Path) -> None:
    engine = GatedEngine()
    with app_for(engine, tmp_path) as client:
        assert client.get("/live").json() == {"status": "alive"}
        health, ready = client.get("/health"), client.get("/ready")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert ready.json()["engine"]["ready"] is False
        engine.loaded.set()
        body = wait_for(client, "/ready", 200)
        assert body["status"] == "ready" and body["engine"]["model"] == "fake-model"
        assert client.get("/health").status_code == 200


def test_a_failed_load_is_not_ready_but_alive(tmp_path: Path) -> None:
    engine = GatedEngine(fail=True)
    engine.loaded.set()
    with app_for(engine, tmp_path) as client:
        body = wait_for(client, "/ready", 503)
        deadline = time.monotonic() + 10
        while body["status"] != "failed":
            assert time.monotonic() < deadline
            body = client.get("/ready").json()
        assert "weights are corrupt" in body["error"]
        assert client.get("/live").status_code == 200


def test_a_stuck_engine_is_not_ready_until_it_moves_again(tmp_path: Path) -> None:
    engine = GatedEngine()
    engine.loaded.set()
    with app_for(engine, tmp_path) as client, ThreadPoolExecutor(1) as pool:
        wait_for(client, "/ready", 200)
        state_of(client.app).engine_watch.stall_after = 0.3
        engine.step.clear()  # the next token never comes
        answer = pool.submit(client.post, "/", json={"prompt": "hi"}, headers={"Authorization": "t"})
        body = wait_for(client, "/ready", 503)
        assert body["status"] == "stalled" and body["engine"]["running"] == 1
        assert client.get("/health").status_code == 200  # loaded; /ready is the one that tells
        engine.step.set()
        assert answer.result(10).status_code == 200
        wait_for(client, "/ready", 200)


def test_probes_refuse_other_methods(tmp_path: Path) -> None:
    engine = GatedEngine()
    engine.loaded.set()
    with app_for(engine, tmp_path) as client:
        for path in ("/live", "/ready", "/health"):
            assert client.post(path).status_code == 405


# -- the stall rule, step by step --


def health(running: int = 0, waiting: int = 0, finished: int = 0, steps: int | None = None) -> EngineHealth:
    details: dict[str, object] = {} if steps is None else {"steps": steps}
    return EngineHealth(True, "fake", "m", running, waiting, 0, finished, details)


def test_engine_watch_tells_busy_from_stuck() -> None:
    progress = Progress()
    watch = EngineWatch(progress, stall_after=60)
    assert watch.stalled_for(health()) is None  # idle is never stuck
    progress.last -= 1000  # long idle, then work arrives: the clock starts when it is first seen
    assert watch.stalled_for(health(waiting=1)) is None
    watch._moved -= 61  # a minute later, nothing moved
    stalled = watch.stalled_for(health(waiting=1))
    assert stalled is not None and stalled > 60
    assert watch.stalled_for(health(running=1, finished=1)) is None  # a request finished: moving
    watch._moved -= 61
    assert watch.stalled_for(health(running=1, finished=1, steps=5)) is None  # a step ran: moving
    watch._moved -= 61
    progress.touch()  # text flowed to a client
    assert watch.stalled_for(health(running=1, finished=1, steps=5)) is None
