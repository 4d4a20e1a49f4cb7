"""SSE encoding and the merging of several choices' streams: errors and aborts."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from easllm.engine.backends.fake import FakeEngine
from easllm.engine.base import EngineOverloaded
from easllm.engine.types import GenerationRequest, SamplingParams
from easllm.errors import InvalidRequest
from easllm.server.sse import sse_bytes
from easllm.serving.choices import merge_choices


async def events(*items: object) -> AsyncIterator[dict]:
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item  # type: ignore[misc]


async def wire(stream: AsyncIterator[dict]) -> list[bytes]:
    return [chunk async for chunk in sse_bytes(stream)]


async def test_events_are_data_lines_ending_with_done() -> None:
    out = await wire(events({"a": 1}, {"b": "é"}))
    assert out == [b'data: {"a": 1}\n\n', 'data: {"b": "é"}\n\n'.encode(), b"data: [DONE]\n\n"]


@pytest.mark.parametrize(
    ("error", "status"),
    [(InvalidRequest("bad", "messages"), 400), (EngineOverloaded("full"), 503), (RuntimeError("boom"), 500)],
)
async def test_an_error_mid_stream_is_one_error_event_and_no_done(error: Exception, status: int) -> None:
    out = await wire(events({"a": 1}, error))
    assert out[0] == b'data: {"a": 1}\n\n' and len(out) == 2
    assert out[1].startswith(b"data: ") and out[1].endswith(b"\n\n")
    body = json.loads(out[1][6:])
    assert body["error"]["code"] == status and str(error) in body["error"]["message"]


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine(token_delay=0.01)
    await fake.start()
    yield fake
    await fake.close()


def request(max_new_tokens: int, seed: int = 0) -> GenerationRequest:
    return GenerationRequest([1, *map(ord, "go")], SamplingParams(max_new_tokens=max_new_tokens, seed=seed))


async def test_merge_yields_every_choice_to_its_end(engine: FakeEngine) -> None:
    streams = [engine.generate(request(3)), engine.generate(request(5, 1))]
    seen: dict[int, list] = {0: [], 1: []}
    async for index, delta in merge_choices(streams):
        seen[index].append(delta)
    assert [d.usage.completion_tokens for d in (seen[0][-1], seen[1][-1])] == [3, 5]  # type: ignore[union-attr]
    assert all(d.finish_reason is None for d in seen[0][:-1] + seen[1][:-1])


async def test_closing_the_merge_aborts_every_choice(engine: FakeEngine) -> None:
    streams = [engine.generate(request(500)), engine.generate(request(500, 1))]
    async with aclosing(merge_choices(streams)) as merged:
        async for _ in merged:
            break
    for _ in range(200):
        if engine.health().aborted_total == 2:
            break
        await asyncio.sleep(0.01)
    health = engine.health()
    assert health.aborted_total == 2 and health.finished_total == 0


async def test_an_engine_error_in_one_choice_ends_the_merge(engine: FakeEngine) -> None:
    async def broken() -> AsyncIterator:
        raise EngineOverloaded("the engine queue is full")
        yield  # pragma: no cover

    with pytest.raises(EngineOverloaded):
        async for _ in merge_choices([engine.generate(request(500)), broken()]):
            pass
    for _ in range(200):
        if engine.health().aborted_total == 1:
            break
        await asyncio.sleep(0.01)
    assert engine.health().aborted_total == 1
