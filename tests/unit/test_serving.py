"""The serving layer over the fake engine, without HTTP: n choices, grounding, observation done
once per choice, disconnects that abort, and no web framework imported."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from easllm.chat.template import Conversation
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import FinishReason, SamplingParams
from easllm.errors import InvalidRequest
from easllm.export.exporter import HistoryExporter
from easllm.rag.store import Chunk, Hit
from easllm.server.metrics import ServiceMetrics
from easllm.serving.caller import Caller, RequestInfo
from easllm.serving.chat import ChatCall, ChatServing, CompletionCall, Turn
from easllm.serving.observe import RoundObserver


class Recorded(HistoryExporter):
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def record(self, line: bytes) -> None:
        self.lines.append(json.loads(line))


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    engine = FakeEngine(context_length=512)
    await engine.start()
    yield engine
    await engine.close()


def observed(engine: FakeEngine) -> tuple[ChatServing, Recorded, ServiceMetrics]:
    history, metrics = Recorded(), ServiceMetrics(engine)
    observer = RoundObserver("svc", engine, metrics, history)
    return ChatServing(engine, max_round=5, observer=observer), history, metrics


def rounds(metrics: ServiceMetrics, api: str, finish: str) -> float | None:
    return metrics.registry.get_sample_value("easllm_rounds_total", {"api": api, "finish_reason": finish})


SAMPLING = SamplingParams(max_new_tokens=6, temperature=0.8, seed=7)


async def test_n_choices_are_separate_requests_with_their_own_seeds(engine: FakeEngine) -> None:
    chat, history, metrics = observed(engine)
    call = ChatCall("openai.chat", [{"role": "user", "content": "hi"}], SAMPLING, n=3)
    generation = await chat.chat(call, Caller())
    choices = await generation.collect()
    assert choices is not None and [c.index for c in choices] == [0, 1, 2]
    assert all(c.finish_reason is FinishReason.LENGTH and c.completion_tokens == 6 for c in choices)
    seeds = [r.sampling.seed for r in engine.requests[-3:]]
    assert len(set(seeds)) == 3  # each choice its own derived seed
    assert len({tuple(r.prompt_token_ids) for r in engine.requests[-3:]}) == 1  # one prompt
    assert generation.prompt_tokens == len(engine.requests[-1].prompt_token_ids)
    assert sorted(line["choice"] for line in history.lines) == [0, 1, 2]
    assert rounds(metrics, "openai.chat", "length") == 3.0


async def test_completions_fan_out_over_prompts_and_choices(engine: FakeEngine) -> None:
    chat, history, _ = observed(engine)
    generation = await chat.complete(CompletionCall("openai.completions", ["a", "bb"], SAMPLING, n=2))
    choices = await generation.collect()
    assert choices is not None and len(choices) == 4
    prompts = [engine.detokenize(r.prompt_token_ids) for r in engine.requests[-4:]]
    assert prompts == ["a", "a", "bb", "bb"]
    assert generation.prompt_tokens == 2 + 3  # each prompt once (BOS + characters)
    assert [line["prompt"] for line in sorted(history.lines, key=lambda r: r["choice"])] == [
        "a",
        "a",
        "bb",
        "bb",
    ]


async def test_a_turn_is_observed_once_and_counted_on_the_callers_access_log_line(
    engine: FakeEngine,
) -> None:
    chat, history, metrics = observed(engine)
    info = RequestInfo()
    caller = Caller(info=info, client="10.1.2.3", arrived=info.started)
    turn = Turn("eas", Conversation("hello [eos]", "Be brief."), SAMPLING)
    generation = await chat.converse(turn, caller)
    (choice,) = await generation.collect() or []
    usage = generation.usage(choice)
    assert choice.text == "You said: hello [eos]." and usage.prompt_tokens == generation.prompt_tokens
    (line,) = history.lines
    assert line["api"] == "eas" and line["client"] == "10.1.2.3" and line["request_id"] == info.request_id
    assert line["system_prompt"] == "Be brief." and line["response"] == choice.text
    assert rounds(metrics, "eas", "stop") == 1.0
    assert (info.rounds, info.completion_tokens) == (1, usage.completion_tokens)
    assert info.prompt_tokens == usage.prompt_tokens > 0


async def test_grounding_puts_the_excerpts_in_the_prompt_and_returns_the_sources(engine: FakeEngine) -> None:
    chat, history, _ = observed(engine)
    hits = [Hit(Chunk("pump.md", "The pump runs at 5 bar.", heading="Pump"), 0.91)]
    chat.prompts.retrieve = lambda question: hits  # type: ignore[method-assign]
    turn = Turn("eas", Conversation("pressure? [eos]"), SAMPLING, use_knowledge=True)
    generation = await chat.converse(turn)
    assert [(s.source, s.score, s.heading) for s in generation.sources] == [("pump.md", 0.91, "Pump")]
    await generation.collect()
    prompt = engine.detokenize(engine.requests[-1].prompt_token_ids)
    assert "The pump runs at 5 bar." in prompt and "pressure?" in prompt
    (line,) = history.lines
    assert line["prompt"] == "pressure? [eos]"  # the question asked, not the grounded one
    assert line["sources"][0]["source"] == "pump.md"


async def test_an_empty_knowledge_base_is_a_400_before_the_engine_is_asked(engine: FakeEngine) -> None:
    chat, history, _ = observed(engine)
    with pytest.raises(InvalidRequest) as refused:
        await chat.converse(Turn("eas", Conversation("q"), SAMPLING, use_knowledge=True))
    assert refused.value.param == "langchain"
    messages = [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]
    with pytest.raises(InvalidRequest, match="alternate"):
        await chat.chat(ChatCall("openai.chat", messages, SAMPLING, use_knowledge=True))
    assert engine.requests == [] and history.lines == []


async def test_a_prompt_too_long_for_the_context_names_its_field(engine: FakeEngine) -> None:
    chat, _, _ = observed(engine)
    long_text = "x" * 600
    with pytest.raises(InvalidRequest) as chat_refused:
        await chat.chat(ChatCall("openai.chat", [{"role": "user", "content": long_text}], SAMPLING))
    with pytest.raises(InvalidRequest) as completion_refused:
        await chat.complete(CompletionCall("openai.completions", [long_text], SAMPLING))
    assert chat_refused.value.param == "messages" and completion_refused.value.param == "prompt"
    assert "the model's context is 512" in completion_refused.value.message


async def test_a_caller_that_goes_away_aborts_the_generation() -> None:
    engine = FakeEngine(context_length=100_000, token_delay=0.002)
    await engine.start()
    chat, history, metrics = observed(engine)
    gone = asyncio.Event()

    async def is_disconnected() -> bool:
        return gone.is_set()

    long = SamplingParams(max_new_tokens=100_000, temperature=0.0)
    turn = Turn("eas", Conversation("talk forever"), long)
    generation = await chat.converse(turn, Caller(is_disconnected=is_disconnected))
    collecting = asyncio.create_task(generation.collect())
    await asyncio.sleep(0.3)
    assert not collecting.done()
    gone.set()
    assert await asyncio.wait_for(collecting, 5) is None
    deadline = time.monotonic() + 5
    while engine.health().aborted_total < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert engine.health().running == 0
    await engine.close()
    (line,) = history.lines
    assert line["finish_reason"] == "abort" and rounds(metrics, "eas", "abort") == 1.0


async def test_without_an_observer_nothing_is_recorded(engine: FakeEngine) -> None:
    chat = ChatServing(engine, max_round=5)
    generation = await chat.converse(Turn("webui", Conversation("hi [eos]"), SAMPLING), start=False)
    assert engine.requests == []  # not started: the WebUI shows the question first
    (choice,) = await generation.collect() or []
    assert choice.text == "You said: hi [eos]."


def test_the_serving_layer_imports_no_web_framework() -> None:
    code = (
        "import sys, easllm.serving.chat, easllm.serving.observe, easllm.serving.choices; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'gradio'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
