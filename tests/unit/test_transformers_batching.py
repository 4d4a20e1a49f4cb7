"""The transformers continuous-batching engine on a tiny random model: same answers as one at a
time, abort, queue limit, and the requests it hands to the sequential engine or refuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from easllm.config import EngineConfig
from easllm.engine.backends.transformers import TransformersEngine
from easllm.engine.backends.transformers_batching import TransformersBatchingEngine
from easllm.engine.base import Engine, EngineOverloaded
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams
from easllm.errors import InvalidRequest
from tests.tiny_model import build_tiny_model

PROMPTS = ["hello world", "the quick brown fox", "東京は日本の", "this is a tiny model for"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def config(**overrides: object) -> EngineConfig:
    return EngineConfig(engine="transformers", cpu=True, precision="fp32", threads=1, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[TransformersBatchingEngine]:
    engine = TransformersBatchingEngine(model_dir, config(), "tiny")
    await engine.start()
    yield engine
    await engine.close()


def request(engine: Engine, text: str, max_new_tokens: int = 24, **sampling: object) -> GenerationRequest:
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(engine.tokenize(text), params)


async def answer(engine: Engine, req: GenerationRequest) -> tuple[str, FinishReason | None, int]:
    deltas = [d async for d in engine.generate(req)]
    last = deltas[-1]
    assert last.usage is not None
    return "".join(d.text for d in deltas), last.finish_reason, last.usage.completion_tokens


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_concurrent_greedy_answers_match_the_sequential_engine(model_dir: Path, engine) -> None:
    sequential = TransformersEngine(model_dir, config(), "tiny")
    await sequential.start()
    try:
        alone = [await answer(sequential, request(sequential, p)) for p in PROMPTS]
    finally:
        await sequential.close()
    together = await asyncio.gather(*(answer(engine, request(engine, p)) for p in PROMPTS))
    assert together == alone
    assert all(text and tokens > 0 for text, _, tokens in together)
    health = engine.health()
    assert health.finished_total == len(PROMPTS) and health.details["sequential_running"] == 0
    assert health.running == 0 and health.waiting == 0


async def test_stop_string_ends_the_answer_before_it(engine) -> None:
    full, _, _ = await answer(engine, request(engine, PROMPTS[0]))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    text, reason, _ = await answer(engine, request(engine, PROMPTS[0], stop=(stop,)))
    assert reason is FinishReason.STOP and text == full[: full.index(stop)]


async def test_aborting_one_leaves_the_others_to_finish_and_frees_it(engine) -> None:
    streams = [engine.generate(request(engine, p, max_new_tokens=300)) for p in PROMPTS[:3]]
    firsts = [await anext(s) for s in streams]
    assert all(d.finish_reason is None for d in firsts)
    await streams[1].aclose()  # the client of the second goes away
    rest = [[d async for d in s] for s in (streams[0], streams[2])]
    for deltas in rest:
        assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    health = engine.health()
    assert health.aborted_total == 1 and health.finished_total == 2
    assert health.running == 0 and health.waiting == 0
    await until(lambda: engine.health().details["manager_running"] == 0)  # its KV blocks are freed
    assert engine.health().details["manager_waiting"] == 0


async def test_requests_past_the_queue_limit_are_refused(model_dir: Path) -> None:
    engine = TransformersBatchingEngine(model_dir, config(max_batch=1, max_queue=1), "tiny")
    await engine.start()
    try:
        running = engine.generate(request(engine, PROMPTS[0], max_new_tokens=400))
        await anext(running)
        queued = engine.generate(request(engine, PROMPTS[1], max_new_tokens=400))
        waiting = asyncio.create_task(anext(queued))  # it waits for the one slot
        await until(lambda: engine.health().waiting == 1)
        assert engine.health().running == 1
        with pytest.raises(EngineOverloaded):
            await anext(engine.generate(request(engine, PROMPTS[2])))
        await running.aclose()
        assert (await waiting).finish_reason is None  # the queued one runs now
        await queued.aclose()
        assert (await answer(engine, request(engine, PROMPTS[2])))[2] > 0  # room again
    finally:
        await engine.close()


async def test_seeded_sampling_and_repetition_penalty_go_to_the_sequential_engine(engine) -> None:
    assert engine.sequential is not None
    seeded = request(engine, PROMPTS[0], temperature=1.0, seed=7)
    first, second = await answer(engine, seeded), await answer(engine, seeded)
    assert first == second  # the seed is honoured: the same answer twice
    await answer(engine, request(engine, PROMPTS[1], repetition_penalty=1.3))
    assert engine.sequential.health().finished_total == 3
    await answer(engine, request(engine, PROMPTS[1], seed=7))  # greedy: the seed changes nothing
    await answer(engine, request(engine, PROMPTS[1], temperature=0.8, top_k=5, top_p=0.9))
    assert engine.sequential.health().finished_total == 3  # both went through continuous batching
    assert engine.health().finished_total == 5


@pytest.mark.parametrize(
    ("param", "value"),
    [("grammar", "root ::= [a]"), ("logprobs", 2), ("presence_penalty", 0.5), ("frequency_penalty", 0.5)],
)
async def test_what_neither_path_can_do_is_refused(engine, param: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        await answer(engine, request(engine, PROMPTS[0], **{param: value}))
    assert err.value.param == param
