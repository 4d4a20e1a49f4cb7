"""The scheduler and `step()` over a fake runner that checks every token's slot and position."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from easllm.engine.sequence import SequenceStatus
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, Usage
from tests.unit.fake_runner import EOS, FakeBatchingEngine, FakeRunner, encode, offline_engine, reference

PROMPTS = ["hello there", "the quick brown fox", "a", "jumps over the lazy dog again and again"]


@dataclass
class Result:
    text: str = ""
    finish: FinishReason | None = None
    usage: Usage | None = None
    deltas: list[TokenDelta] = field(default_factory=list)


def submit(engine: FakeBatchingEngine, text: str, rid: str | None = None, **sampling) -> str:
    params = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 12, **sampling})
    req = GenerationRequest(encode(text), params, request_id=rid or text)
    engine.scheduler.add(engine.sequence(req))
    return req.request_id


def collect(results: dict[str, Result], deltas: list[TokenDelta]) -> None:
    for delta in deltas:
        r = results.setdefault(delta.request_id, Result())
        r.text += delta.text
        r.deltas.append(delta)
        if delta.finish_reason is not None:
            r.finish, r.usage = delta.finish_reason, delta.usage


def run(engine: FakeBatchingEngine, results: dict[str, Result] | None = None, max_steps: int = 2000):
    results = {} if results is None else results
    for _ in range(max_steps):
        if not engine.scheduler.has_work():
            return results
        collect(results, engine.step())
    raise AssertionError("the engine did not finish")


def test_each_sequence_in_a_batch_gets_the_text_it_gets_alone() -> None:
    engine = offline_engine(FakeRunner(max_seqs=4, max_batch_tokens=16))
    for p in PROMPTS:
        submit(engine, p)
    results = run(engine)
    for p in PROMPTS:
        assert results[p].text == reference(encode(p), 12)
        alone = offline_engine()
        submit(alone, p)
        assert run(alone)[p].text == results[p].text


def test_admission_up_to_max_seqs_then_the_queue_moves_on() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64)
    engine = offline_engine(runner)
    submit(engine, "hello there", max_new_tokens=3)
    submit(engine, "the quick brown fox", max_new_tokens=30)
    submit(engine, "a", max_new_tokens=3)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["hello there", "the quick brown fox"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["a"]
    results = run(engine)
    first_a = next(i for i, b in enumerate(runner.batches) if any(rid == "a" for rid, _, _ in b))
    done_hello = max(i for i, b in enumerate(runner.batches) if any(c[0] == "hello there" for c in b))
    assert first_a == done_hello + 1, "the waiting sequence takes the slot freed in the step before"
    assert results["a"].text == reference(encode("a"), 3)
    assert all(len(b) <= 2 for b in runner.batches)


def test_new_sequences_are_admitted_while_others_decode() -> None:
    runner = FakeRunner(max_seqs=4, max_batch_tokens=64)
    engine = offline_engine(runner)
    submit(engine, "hello there", max_new_tokens=20)
    for _ in range(3):
        engine.step()
    submit(engine, "a")
    engine.step()
    assert {rid for rid, _, _ in runner.batches[-1]} == {"hello there", "a"}


def test_chunked_prefill_keeps_decodes_going_within_the_token_budget() -> None:
    runner = FakeRunner(max_seqs=4, max_batch_tokens=8)
    engine = offline_engine(runner)
    submit(engine, "ab", max_new_tokens=30)
    results: dict[str, Result] = {}
    collect(results, engine.step())
    long_prompt = "jumps over the lazy dog again and again"
    submit(engine, long_prompt, max_new_tokens=2)
    run(engine, results)
    assert all(sum(n for _, _, n in b) <= 8 for b in runner.batches)
    prefill = [c for b in runner.batches for c in b if c[0] == long_prompt and c[2] > 1]
    assert len(prefill) >= 5, "the long prompt is fed in chunks"
    assert [start for _, start, _ in prefill] == sorted(start for _, start, _ in prefill)
    steps_with_prefill = [b for b in runner.batches if any(c in prefill for c in b)]
    assert all(any(rid == "ab" and n == 1 for rid, _, n in b) for b in steps_with_prefill), (
        "the decoding sequence gets its token in every step of the other's prefill"
    )
    assert results[long_prompt].text == reference(encode(long_prompt), 2)
    assert results["ab"].text == reference(encode("ab"), 30)


def test_a_prompt_that_does_not_fit_the_kv_cache_waits_for_room() -> None:
    runner = FakeRunner(max_seqs=4, max_batch_tokens=64, kv_cells=30)
    engine = offline_engine(runner)
    submit(engine, "hello there", max_new_tokens=10)  # 12 prompt tokens, up to 22 cells
    submit(engine, "the quick brown fox", max_new_tokens=4)  # 20 prompt tokens: no room yet
    results: dict[str, Result] = {}
    collect(results, engine.step())
    assert [s.request_id for s in engine.scheduler.waiting] == ["the quick brown fox"]
    run(engine, results)
    assert engine.scheduler.preempted_total == 0
    assert results["the quick brown fox"].text == reference(encode("the quick brown fox"), 4)
    assert results["hello there"].text == reference(encode("hello there"), 10)


def test_a_full_kv_cache_preempts_the_newest_sequence_which_resumes_with_the_same_text() -> None:
    runner = FakeRunner(max_seqs=4, max_batch_tokens=64, kv_cells=48)
    engine = offline_engine(runner)
    prompts = ["hello there", "the quick", "fox jumps"]
    for p in prompts:
        submit(engine, p, max_new_tokens=14)
    results = run(engine)
    assert engine.scheduler.preempted_total >= 1
    for p in prompts:
        assert results[p].text == reference(encode(p), 14)
        assert results[p].usage.completion_tokens == len(results[p].text)
    assert runner.kv_cells_used() == engine.scheduler.cache.cells_cached > 0  # only cached prefixes
    assert engine.scheduler.cache.cells_locked == 0


def test_abort_frees_the_slot_and_its_kv_cells_without_the_prefix_cache() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64, num_seq_ids=2)
    engine = offline_engine(runner, prefix_cache=False)
    submit(engine, "hello there", max_new_tokens=50)
    submit(engine, "the quick", max_new_tokens=50)
    submit(engine, "a", max_new_tokens=3)
    for _ in range(3):
        engine.step()
    slot = next(s.slot for s in engine.scheduler.running if s.request_id == "hello there")
    cells_before = runner.kv_cells_used()
    final = engine.scheduler.abort("hello there")
    assert final is not None and final.finish_reason is FinishReason.ABORT
    assert runner.released == [slot] and slot not in runner.cache
    assert runner.kv_cells_used() == cells_before - (12 + 2)
    assert engine.scheduler.abort("hello there") is None
    engine.step()
    assert next(s for s in engine.scheduler.running if s.request_id == "a").slot == slot
    assert engine.scheduler.abort("the quick").usage.completion_tokens == 4
    run(engine)
    assert runner.kv_cells_used() == 0 and not engine.scheduler.running


def test_abort_of_a_waiting_sequence_removes_it_from_the_queue() -> None:
    engine = offline_engine(FakeRunner(max_seqs=1))
    submit(engine, "hello there")
    submit(engine, "a")
    engine.step()
    assert engine.scheduler.abort("a").finish_reason is FinishReason.ABORT
    assert not engine.scheduler.waiting
    assert engine.fake_runner.released == []


def test_finish_by_length_counts_tokens() -> None:
    engine = offline_engine()
    submit(engine, "hello there", max_new_tokens=5)
    r = run(engine)["hello there"]
    assert r.finish is FinishReason.LENGTH and r.usage == Usage(12, 5) and len(r.text) == 5
    assert r.deltas[-1].finish_reason is FinishReason.LENGTH and r.deltas[-1].token_ids


def test_finish_by_the_per_sequence_context() -> None:
    engine = offline_engine(context_length=16)
    submit(engine, "hello there", max_new_tokens=50)
    r = run(engine)["hello there"]
    assert r.finish is FinishReason.LENGTH and r.usage.completion_tokens == 16 - 12


def test_finish_by_end_of_sequence_token() -> None:
    engine = offline_engine()
    prompt = "fuzz"  # next_token after "zz" is the end of sequence
    submit(engine, prompt)
    r = run(engine)[prompt]
    assert r.finish is FinishReason.STOP and r.text == "" and r.usage == Usage(5, 0)
    assert engine.fake_runner.kv_cells_used() == engine.scheduler.cache.cells_cached == 5


def test_finish_by_stop_string_cuts_the_text() -> None:
    full = reference(encode("hello there"), 12)
    stop = full[4:6]
    engine = offline_engine()
    submit(engine, "hello there", stop=(stop,))
    r = run(engine)["hello there"]
    assert r.finish is FinishReason.STOP
    assert r.text == full[: full.index(stop)] and stop not in r.text


def test_grammar_constrains_the_tokens() -> None:
    engine = offline_engine()
    submit(engine, "hello there", grammar="ab")
    r = run(engine)["hello there"]
    assert r.text and set(r.text) <= {"a", "b"}
    grammar = engine.fake_runner.grammars[0]
    assert grammar.closed and grammar.accepted == [t for d in r.deltas for t in d.token_ids]


def test_bad_requests_are_rejected_before_scheduling() -> None:
    from easllm.errors import InvalidRequest

    engine = offline_engine(context_length=8)
    with pytest.raises(InvalidRequest) as e:
        engine.sequence(GenerationRequest(encode("too long prompt")))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest) as e:
        engine.sequence(GenerationRequest([1, 999]))
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest) as e:
        engine.sequence(GenerationRequest(encode("a"), SamplingParams(grammar="1 2 3")))
    assert e.value.param == "grammar"


def test_statuses_follow_the_sequence() -> None:
    engine = offline_engine(FakeRunner(max_seqs=1))
    submit(engine, "hello there", max_new_tokens=2)
    submit(engine, "a", max_new_tokens=2)
    first, second = engine.scheduler.waiting
    engine.step()
    assert first.status is SequenceStatus.RUNNING and second.status is SequenceStatus.WAITING
    run(engine)
    assert first.status is second.status is SequenceStatus.FINISHED
    assert first.slot is None and EOS not in first.token_ids
