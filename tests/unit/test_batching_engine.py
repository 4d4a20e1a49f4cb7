"""The batching engine's thread and streams over a fake runner: the Engine protocol end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from easllm.engine.base import Engine, EngineError, EngineOverloaded
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta
from easllm.errors import InvalidRequest, NotReady
from tests.unit.fake_runner import FakeBatchingEngine, FakeRunner, encode, reference

PROMPTS = ["hello there", "the quick brown fox", "a", "jumps over", "lazy dog", "once upon a time"]
LONG = "long story"  # its fake answer has no end of sequence within 500 tokens


def request(text: str, max_new_tokens: int = 12, **sampling) -> GenerationRequest:
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling})
    return GenerationRequest(encode(text), params)


async def answer(engine: FakeBatchingEngine, req: GenerationRequest) -> tuple[str, list[TokenDelta]]:
    deltas = [d async for d in engine.generate(req)]
    return "".join(d.text for d in deltas), deltas


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
async def engine() -> AsyncIterator[FakeBatchingEngine]:
    engine = FakeBatchingEngine(FakeRunner(max_seqs=4, max_batch_tokens=16, delay=0.001), max_queue=8)
    await engine.start()
    yield engine
    await engine.close()


def test_it_fits_the_engine_protocol(engine: FakeBatchingEngine) -> None:
    assert isinstance(engine, Engine)


async def test_concurrent_requests_each_get_their_own_answer(engine: FakeBatchingEngine) -> None:
    results = await asyncio.gather(*(answer(engine, request(p)) for p in PROMPTS))
    for prompt, (text, deltas) in zip(PROMPTS, results, strict=True):
        assert text == reference(encode(prompt), 12)
        last = deltas[-1]
        assert last.finish_reason is not None and last.usage.prompt_tokens == len(encode(prompt))
        assert last.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert max(len(b) for b in engine.fake_runner.batches) == 4, "requests were decoded together"
    health = engine.health()
    assert (health.running, health.waiting, health.finished_total, health.aborted_total) == (0, 0, 6, 0)
    assert health.details["kv_cells_used"] == health.details["kv_cells_cached"] > 0  # cached prefixes
    assert health.details["kv_cells_total"] == 256
    assert health.details["max_batch"] == 4


async def test_closing_the_stream_aborts_and_frees_the_running_cells(engine: FakeBatchingEngine) -> None:
    assert len(reference(encode(LONG), 500)) == 500
    stream = engine.generate(request(LONG, 500))
    await anext(stream)
    await anext(stream)
    assert engine.health().running == 1 and engine.fake_runner.kv_cells_used() > 0
    await stream.aclose()
    await until(lambda: engine.health().aborted_total == 1)
    health = engine.health()
    assert health.running == 0 and health.details["kv_cells_used"] == health.details["kv_cells_cached"]
    assert engine.scheduler.cache.cells_locked == 0 and health.finished_total == 0
    text, _ = await answer(engine, request("a"))
    assert text == reference(encode("a"), 12), "the engine goes on serving"


async def test_abort_by_request_id_ends_the_stream(engine: FakeBatchingEngine) -> None:
    req = request(LONG, 500)
    stream = engine.generate(req)
    await anext(stream)
    await engine.abort(req.request_id)
    rest = [d async for d in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert engine.health().aborted_total == 1


async def test_abort_of_a_queued_request(engine: FakeBatchingEngine) -> None:
    streams = [engine.generate(request(LONG, 500)) for _ in range(5)]
    firsts = await asyncio.gather(*(anext(s) for s in streams[:4]))
    assert len(firsts) == 4
    queued = asyncio.ensure_future(anext(streams[4]))
    await until(lambda: engine.health().waiting == 1)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    await streams[4].aclose()
    await until(lambda: engine.health().aborted_total == 1)
    assert engine.health().waiting == 0 and engine.health().running == 4
    for s in streams[:4]:
        await s.aclose()
    await until(lambda: engine.health().running == 0)
    assert engine.health().details["kv_cells_used"] == engine.health().details["kv_cells_cached"]


async def test_a_full_queue_is_refused() -> None:
    engine = FakeBatchingEngine(FakeRunner(max_seqs=1, delay=0.001), max_queue=1)
    await engine.start()
    try:
        running = engine.generate(request(LONG, 500))
        await anext(running)
        waiting = asyncio.ensure_future(anext(engine.generate(request("a"))))
        await until(lambda: engine.health().waiting == 1)
        with pytest.raises(EngineOverloaded):
            await anext(engine.generate(request("a")))
        await running.aclose()
        assert (await waiting).text
    finally:
        await engine.close()


async def test_logprobs_come_with_each_token(engine: FakeBatchingEngine) -> None:
    text, deltas = await answer(engine, request("a", 5, logprobs=2))
    entries = [lp for d in deltas for lp in d.logprobs or []]
    assert len(entries) == 5 and "".join(e.token for e in entries) == text
    assert all(e.logprob <= 0 and len(e.top) == 2 and e.token in e.top for e in entries)


async def test_bad_requests_raise_before_any_text(engine: FakeBatchingEngine) -> None:
    with pytest.raises(InvalidRequest) as e:
        await anext(engine.generate(request("x" * 200)))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest) as e:
        await anext(engine.generate(request("a", grammar="{}")))
    assert e.value.param == "grammar"


async def test_a_failed_forward_pass_fails_the_running_requests_only(engine: FakeBatchingEngine) -> None:
    engine.fake_runner.fail_next = RuntimeError("boom")
    with pytest.raises(EngineError, match="boom"):
        await answer(engine, request("a"))
    assert engine.health().running == 0
    text, _ = await answer(engine, request("a"))
    assert text == reference(encode("a"), 12)


async def test_not_ready_before_start_and_streams_end_on_close() -> None:
    engine = FakeBatchingEngine(FakeRunner(delay=0.001))
    with pytest.raises(NotReady):
        await anext(engine.generate(request("a")))
    assert not engine.health().ready
    await engine.start()
    assert engine.health().ready and engine.model_info.features == {"logprobs", "grammar", "penalties"}
    stream = engine.generate(request(LONG, 500, grammar="abcdefghijklmnopqrstuvwxyz"))
    await anext(stream)
    await engine.close()
    with pytest.raises(NotReady):
        async for _ in stream:
            pass
    assert engine.fake_runner.closed and not engine.health().ready
    assert engine.fake_runner.grammars[0].closed and engine.scheduler.cache.cells_locked == 0
    await engine.start()  # an app may run its lifespan again
    text, _ = await answer(engine, request("a"))
    assert text == reference(encode("a"), 12)
    await engine.close()
