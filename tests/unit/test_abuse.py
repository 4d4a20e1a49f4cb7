"""The abuse throttle (server/abuse.py): a client whose requests keep being refused is delayed, then
answered 429; other clients, and clients whose requests succeed, are never delayed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from easllm.cli import build_parser, configs_from
from easllm.config import LimitsConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.server.abuse import MAX_HELD, RefusalBudget, is_refusal
from easllm.server.routes.websocket import EOS
from easllm.server.state import state_of
from tests.apps import serving

ATTACKER, OTHER = "10.0.0.1", "10.0.0.2"
BAD = {"content": b'{"prompt": ', "headers": {"Content-Type": "application/json"}}


@contextmanager
def start(tmp: Path, **limits: float) -> Iterator[TestClient]:
    config = ServerConfig(
        api_only=True,
        data_dir=tmp,
        sampling=SamplingDefaults(max_new_tokens=4),
        limits=LimitsConfig(**limits),  # type: ignore[arg-type]
    )
    with serving(config, FakeEngine(context_length=512)) as client:
        yield client


def from_address(first: TestClient, address: str) -> TestClient:
    """Another client of the same running app (its event loop), from `address`."""
    client = TestClient(first.app, client=(address, 50000))
    client.portal = first.portal
    return client


def timed_post(client: TestClient, **kwargs: object) -> tuple[int, float, dict[str, str]]:
    started = time.monotonic()
    r = client.post("/", **kwargs)  # type: ignore[arg-type]
    return r.status_code, time.monotonic() - started, dict(r.headers)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_refusals_within_the_burst_cost_nothing_then_each_waits_its_share() -> None:
    t = FakeTime()
    budget = RefusalBudget(rate=10, burst=20, clock=t.clock, sleep=t.sleep)

    async def refused_requests(n: int) -> None:
        for _ in range(n):
            assert await budget.admit("a")
            budget.charge("a", 1.0)

    asyncio.run(refused_requests(21))
    assert t.slept == [] and budget.wait("a") == pytest.approx(0.1)  # 21 refusals at once: 1 over
    asyncio.run(refused_requests(1))
    assert t.slept == [pytest.approx(0.2)]  # its debt and its own ticket
    t.now += 0.5
    assert budget.wait("a") == 0 and budget.tokens("a") == pytest.approx(4.0)  # -1, then 0.5 s at 10/s
    t.now += 10
    assert budget.tokens("a") == 20 and len(budget) == 0  # refilled: forgotten
    assert budget.wait("b") == 0 and budget.tokens("b") == 20


def test_a_closed_loop_of_refusals_gets_the_rate_and_a_success_gets_its_ticket_back() -> None:
    t = FakeTime()
    budget = RefusalBudget(rate=10, burst=5, clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        budget.charge("a", 1.0)

    async def loop(n: int) -> None:
        for _ in range(n):
            delayed = budget.wait("a") > 0
            await budget.admit("a")
            budget.charge("a", 1.0)
            if delayed:
                budget.refund("a")

    asyncio.run(loop(100))
    assert sum(t.slept) == pytest.approx(10.0, abs=0.2)  # 100 refusals: 10 s at 10 a second
    debt = budget.tokens("a")
    asyncio.run(budget.admit("a"))  # delayed, then answered without error: the ticket back
    budget.refund("a")
    assert budget.tokens("a") >= debt


def test_the_debt_has_a_floor_so_no_wait_is_longer_than_max_wait() -> None:
    t = FakeTime()
    budget = RefusalBudget(rate=10, burst=20, max_wait=3.0, clock=t.clock, sleep=t.sleep)
    budget.charge("a", 1e9)  # a huge refused body
    assert budget.wait("a") == pytest.approx(3.0)
    asyncio.run(budget.admit("a"))
    assert max(t.slept) <= 3.0 + 1e-9


def test_at_most_max_held_requests_of_a_client_wait_and_other_clients_never_do() -> None:
    budget = RefusalBudget(rate=1, burst=1, max_held=3)
    budget.charge("a", 3.0)

    async def scenario() -> tuple[list[bool], float]:
        waiting = [asyncio.create_task(budget.admit("a")) for _ in range(3)]
        await asyncio.sleep(0)
        refused = await budget.admit("a")  # the fourth: at once
        started = time.monotonic()
        assert await budget.admit("b")
        other = time.monotonic() - started
        for task in waiting:
            task.cancel()
        return [refused], other

    refused, other = asyncio.run(scenario())
    assert refused == [False] and other < 0.05


def test_buckets_are_bounded_in_memory_and_successes_make_none() -> None:
    budget = RefusalBudget(rate=10, burst=20, max_clients=100)
    for i in range(10_000):
        budget.charge(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 30.0)
    assert len(budget) == 100
    assert budget.wait("10.0.39.15") > 0  # the most recent are kept
    assert budget.wait("10.0.0.0") == 0  # the oldest forgotten first


@pytest.mark.parametrize("status", [400, 404, 405, 408, 413, 414, 431, 401, 429, 200, 503, 500])
def test_which_statuses_are_refusals(status: int) -> None:
    assert is_refusal(status) is (status in {400, 404, 405, 408, 413, 414, 431})


def test_a_flood_of_400s_is_delayed_then_429_while_another_address_is_not(tmp_path: Path) -> None:
    with start(tmp_path, abuse_rate=2, abuse_burst=3) as first:
        attacker, other = from_address(first, ATTACKER), from_address(first, OTHER)
        quick = [timed_post(attacker, **BAD) for _ in range(4)]  # the burst, and one into debt
        assert [status for status, _, _ in quick] == [400] * 4
        status, delayed, _ = timed_post(attacker, **BAD)
        assert status == 400 and delayed >= 0.9  # its debt and its ticket: 2 tokens at 2 a second
        with ThreadPoolExecutor(MAX_HELD + 4) as pool:
            flood = list(pool.map(lambda _: timed_post(attacker, **BAD), range(MAX_HELD + 4)))
        busy = [headers for status, _, headers in flood if status == 429]
        assert busy and all(int(h["retry-after"]) >= 1 for h in busy)  # beyond MAX_HELD waiting
        assert {status for status, _, _ in flood} <= {400, 429}
        status, alone, _ = timed_post(other, **BAD)  # the other address: its first refusal, at once
        assert status == 400 and alone < 0.5
        r = other.post("/", json={"prompt": "hi"})
        assert r.status_code == 200 and r.json()["response"]
        assert state_of(first.app).refusals.wait(OTHER) == 0
        assert state_of(first.app).refusals.wait(ATTACKER) > 0
        r = attacker.post("/", json={"prompt": "hi"})  # in debt: delayed, still served
        assert r.status_code in (200, 429)


def test_an_honest_client_is_never_delayed_however_fast(tmp_path: Path) -> None:
    with start(tmp_path, abuse_rate=1, abuse_burst=1) as first:
        honest = from_address(first, OTHER)
        with ThreadPoolExecutor(8) as pool:
            answered = pool.map(lambda _: honest.post("/", json={"prompt": "hi"}).status_code, range(64))
            statuses = list(answered)
        assert statuses == [200] * 64
        assert honest.get("/v1/models").status_code == 200
        assert len(state_of(first.app).refusals) == 0  # no bucket: nothing can delay it


def test_abuse_rate_0_turns_the_throttle_off(tmp_path: Path) -> None:
    with start(tmp_path, abuse_rate=0) as first:
        assert state_of(first.app).refusals is None
        attacker = from_address(first, ATTACKER)
        assert {attacker.post("/", **BAD).status_code for _ in range(60)} == {400}  # type: ignore[arg-type]


def test_the_flags_set_the_limits() -> None:
    args = build_parser().parse_args(["serve", "--abuse-rate", "0.5", "--abuse-burst", "7"])
    server, _ = configs_from(args)
    assert (server.limits.abuse_rate, server.limits.abuse_burst) == (0.5, 7)
    server, _ = configs_from(build_parser().parse_args(["serve"]))
    assert (server.limits.abuse_rate, server.limits.abuse_burst) == (10.0, 20)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--abuse-rate", "-1"])


def test_websocket_error_replies_make_the_reader_wait(tmp_path: Path) -> None:
    with start(tmp_path, abuse_rate=5, abuse_burst=2) as first:
        attacker = from_address(first, ATTACKER)
        with attacker.websocket_connect("/") as ws:
            started = time.monotonic()
            for _ in range(8):
                ws.send_text('{"prompt": ')
                assert ws.receive_json()["error"]["code"] == 400
                assert ws.receive_text() == EOS
            elapsed = time.monotonic() - started
        assert elapsed >= 0.8  # 8 errors, 3 free: 5 waits of 0.2 s
        assert state_of(first.app).refusals.wait(ATTACKER) > 0


def test_a_websocket_closed_for_its_flood_is_charged_and_the_next_handshakes_wait(tmp_path: Path) -> None:
    with start(tmp_path, abuse_rate=1, abuse_burst=1, ws_max_pending=2) as first:
        attacker = from_address(first, ATTACKER)
        opened = []
        for _ in range(3):  # each close costs 1 token: the first drains the burst, the second goes into debt
            started = time.monotonic()
            with attacker.websocket_connect("/") as ws:
                opened.append(time.monotonic() - started)
                for _ in range(20):
                    ws.send_text("hi")  # valid, but far ahead of the answers
                with pytest.raises(WebSocketDisconnect) as closed:
                    while True:
                        ws.receive_text()
            assert closed.value.code == 1008
        assert opened[0] < 0.5 and opened[2] >= 1.5  # the third handshake paid 1 token of debt + its ticket


def test_requests_under_way_count_so_a_concurrent_burst_cannot_all_pass_before_the_first_is_charged() -> None:
    t = FakeTime()
    budget = RefusalBudget(rate=10, burst=2, clock=t.clock, sleep=t.sleep)
    budget.charge("a", 2.0)  # refused lately: at 0, not in debt
    budget.begin("a")  # one request under way, its answer not known yet

    async def next_one() -> bool:
        return await budget.admit("a")

    assert asyncio.run(next_one()) and t.slept  # it waits for the one under way
    budget.end("a")
    budget.begin("b")  # a client never refused: nothing to count against, no bucket made
    budget.end("b")
    assert len(budget) == 1 and budget.tokens("b") == budget.burst
