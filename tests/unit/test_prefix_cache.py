"""The prefix cache: the radix trie over a fake KV cache of shared cells, and the scheduler using it."""

from __future__ import annotations

import pytest

from easllm.engine.prefix_cache import Node, PrefixCache, common_prefix_len
from easllm.engine.types import FinishReason
from tests.unit.fake_runner import Cell, FakeBatchingEngine, FakeRunner, encode, offline_engine, reference
from tests.unit.test_scheduler import collect, run, submit

SYSTEM = "you are a helpful assistant who answers briefly and well "  # 57 tokens with BOS


def check(engine: FakeBatchingEngine) -> None:
    """The trie and the KV cache agree: every leaf's id holds exactly its path, cells counted once."""
    cache, runner = engine.scheduler.cache, engine.fake_runner
    assert cache.cells_used == runner.kv_cells_used(), "shared cells are counted once, and all of them"
    assert cache.cells_used <= runner.kv_cells
    leaves = 0
    stack: list[tuple[Node, list[int]]] = [(cache.root, [])]
    while stack:
        node, path = stack.pop()
        tokens = path + node.tokens
        if node is not cache.root and node.is_leaf():
            leaves += 1
            assert node.seq_id is not None, "a leaf nobody holds"
            held = runner.cache.get(node.seq_id, [])
            assert [c.token for c in held] == tokens, "a leaf's id holds another path"
        else:
            assert node.seq_id is None or node is cache.root, "an inner node keeps an id"
        for key, child in node.children.items():
            assert child.tokens[0] == key and child.start == node.end and child.parent is node
            stack.append((child, tokens))
        stack.extend((child, tokens) for child in node.others)
    assert leaves == len(runner.cache), "every id in use holds one leaf"


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2, 3], [0, 1, 2, 3], start=1) == 3
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4], end=2) == 2
    assert common_prefix_len(list(range(1000)), [*range(777), -1]) == 777
    assert common_prefix_len([], [1]) == common_prefix_len([5], []) == 0


def test_a_finished_sequence_is_cached_and_the_next_one_reuses_its_longest_prefix() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64)
    engine = offline_engine(runner)
    first = SYSTEM + "what is a cat"
    submit(engine, first, max_new_tokens=6)
    answer = run(engine)[first].text
    check(engine)
    cached = len(encode(first)) + 6 - 1  # prompt and answer; the last sampled token was never fed
    assert engine.scheduler.cache.cells_cached == cached

    second = first + answer + " and a dog"  # the next round: the whole first sequence, then more
    submit(engine, second, max_new_tokens=6)
    runner.batches.clear()
    result = run(engine)[second]
    assert result.text == reference(encode(second), 6)
    assert result.usage.cached_tokens == cached
    assert runner.batches[0] == [(second, cached, len(encode(second)) - cached)], "only the rest is fed"
    check(engine)
    assert engine.scheduler.prefix_queries_total == len(encode(first)) + len(encode(second))
    assert engine.scheduler.prefix_hits_total == cached

    other = SYSTEM + "where is paris"  # shares the system prompt only: the trie branches there
    submit(engine, other, max_new_tokens=4)
    assert run(engine)[other].usage.cached_tokens == common_prefix_len(encode(other), encode(first))
    check(engine)


def test_the_last_prompt_token_is_always_computed() -> None:
    engine = offline_engine(FakeRunner(max_batch_tokens=64))
    prompt = SYSTEM + "again"
    submit(engine, prompt, "one", max_new_tokens=5)
    run(engine)
    submit(engine, prompt, "two", max_new_tokens=5)
    engine.fake_runner.batches.clear()
    result = run(engine)["two"]
    n = len(encode(prompt))
    assert engine.fake_runner.batches[0] == [("two", n - 1, 1)]
    assert result.usage.cached_tokens == n - 1 and result.text == reference(encode(prompt), 5)
    check(engine)  # the duplicate leaf was folded into the first one's cells


def test_concurrent_sequences_with_one_prefix_share_its_cells() -> None:
    runner = FakeRunner(max_seqs=8, max_batch_tokens=32, kv_cells=512)
    engine = offline_engine(runner)
    questions = ["who", "what now", "why not", "when", "how come", "which one", "whose", "where"]
    for q in questions:
        submit(engine, SYSTEM + q, q, max_new_tokens=8)
    results: dict = {}
    peak = 0
    while engine.scheduler.has_work():
        collect(results, engine.step())
        check(engine)
        peak = max(peak, runner.kv_cells_used())
    for q in questions:
        assert results[q].text == reference(encode(SYSTEM + q), 8)
    prefix = len(encode(SYSTEM))
    own = sum(len(encode(q)) - 1 + 8 for q in questions)
    assert peak <= prefix + own, "the system prompt was computed once and shared"
    hits = sorted(results[q].usage.cached_tokens for q in questions)
    assert hits[0] == 0 and min(hits[1:]) >= prefix, hits  # the others waited for the first one


def test_lru_eviction_makes_room_and_never_costs_a_running_sequence() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64, kv_cells=96)
    engine = offline_engine(runner)
    prompts = [f"{w} is the word of this prompt " for w in ("apple", "pear", "plum", "fig", "kiwi")]
    for p in prompts:
        submit(engine, p, max_new_tokens=10)
        assert run(engine)[p].text == reference(encode(p), 10)
        check(engine)
    assert engine.scheduler.cache.evicted_cells_total > 0 and engine.scheduler.preempted_total == 0
    # the newest survive, the oldest went first
    newest, oldest = encode(prompts[-1]), encode(prompts[0])
    assert engine.scheduler.cache.match(newest, len(newest)).length == len(newest)
    assert engine.scheduler.cache.match(oldest, len(oldest)).length == 1  # the BOS all of them share

    # a full cache of cached prefixes serves everyone, concurrently, with no preemption
    for p in prompts:
        submit(engine, p + "again", max_new_tokens=12)
    results = run(engine)
    for p in prompts:
        assert results[p + "again"].text == reference(encode(p + "again"), 12)
    assert engine.scheduler.preempted_total == 0
    check(engine)


def test_sequence_ids_run_out_before_cells_the_oldest_cached_prefix_gives_its_id() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64, kv_cells=4096, num_seq_ids=3)
    engine = offline_engine(runner)
    for word in ("one", "two", "three", "four"):
        submit(engine, word + " cat", max_new_tokens=3)
        run(engine)
        check(engine)
    assert len(runner.cache) <= 3
    assert engine.scheduler.cache.match(encode("four cat"), 9).length == len(encode("four cat"))
    assert engine.scheduler.cache.match(encode("one cat"), 9).length == 1  # the BOS


def test_a_preempted_sequence_resumes_from_its_cached_cells_with_the_same_text() -> None:
    runner = FakeRunner(max_seqs=4, max_batch_tokens=64, kv_cells=48)
    engine = offline_engine(runner)
    prompts = ["hello there", "the quick", "fox jumps"]
    for p in prompts:
        submit(engine, p, max_new_tokens=14)
    results: dict = {}
    while engine.scheduler.has_work():
        collect(results, engine.step())
        check(engine)
    assert engine.scheduler.preempted_total >= 1
    for p in prompts:
        assert results[p].text == reference(encode(p), 14)


def test_abort_mid_prefill_leaves_a_consistent_cache_that_the_next_request_reuses() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=16)
    engine = offline_engine(runner)
    prompt = SYSTEM + "tell me more"
    submit(engine, prompt, "first", max_new_tokens=5)
    engine.step()
    engine.step()  # 32 of its prompt's tokens are computed
    assert engine.scheduler.abort("first").finish_reason is FinishReason.ABORT
    check(engine)
    assert engine.scheduler.cache.cells_cached == 32
    submit(engine, prompt, "second", max_new_tokens=5)
    result = run(engine)["second"]
    assert result.usage.cached_tokens == 32 and result.text == reference(encode(prompt), 5)
    check(engine)


def test_grammar_and_seed_give_the_same_tokens_with_and_without_the_cache() -> None:
    def answers(prefix_cache: bool) -> list[str]:
        engine = offline_engine(FakeRunner(max_batch_tokens=64), prefix_cache=prefix_cache)
        texts = []
        for rid in ("a", "b"):
            submit(engine, SYSTEM + "go", rid, max_new_tokens=8, temperature=1.0, seed=7, grammar="abc")
            texts.append(run(engine)[rid].text)
        return texts

    cached, plain = answers(True), answers(False)
    assert cached == plain and cached[0] == cached[1] and set(cached[0]) <= set("abc")


def test_without_the_prefix_cache_nothing_is_kept_or_reused() -> None:
    runner = FakeRunner(max_seqs=2, max_batch_tokens=64, num_seq_ids=2)
    engine = offline_engine(runner, prefix_cache=False)
    for rid in ("a", "b"):
        submit(engine, SYSTEM + "go", rid, max_new_tokens=4)
        assert run(engine)[rid].usage.cached_tokens == 0
    assert runner.kv_cells_used() == 0 and not runner.copies
    assert engine.health().details["prefix_cache"] is False


def test_the_cache_needs_more_ids_than_running_sequences() -> None:
    with pytest.raises(ValueError, match="more sequence ids"):
        PrefixCache(FakeRunner(max_seqs=2, num_seq_ids=2), 256, 2)


def test_twin_leaves_fold_into_one_and_a_twin_left_alone_is_indexed() -> None:
    runner = FakeRunner(max_seqs=3, num_seq_ids=6)
    cache = PrefixCache(runner, 256, 3)

    texts = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]]
    a, b, c = [cache.admit(cache.match(t, len(t) - 1)) for t in texts]  # at once: nothing cached yet
    for seq_id, tokens in zip((a, b, c), texts, strict=True):  # one forward pass computes them all
        runner.cache[seq_id] = [Cell(t) for t in tokens]
        cache.extend(seq_id, tokens)
    assert cache.cells_used == 12 == runner.kv_cells_used()
    cache.release(b)  # shares a's [1, 2, 3] now; keeps its own 5
    assert cache.cells_used == 9 == runner.kv_cells_used()
    assert cache.match([1, 2, 3, 5, 9], 5).length == 4
    cache.release(a)
    assert not cache.make_room(256)  # evicts every cached leaf; c (running) keeps its cells
    cache.release(c)  # its twin is gone: it is indexed as it is
    assert cache.match([1, 2, 3, 4, 9], 5).length == 4
    assert cache.cells_used == runner.kv_cells_used()


def test_when_the_backend_is_fuller_than_counted_cached_prefixes_go_before_any_running_sequence() -> None:
    engine = offline_engine(FakeRunner(max_seqs=4, max_batch_tokens=64))
    submit(engine, SYSTEM + "old", "old", max_new_tokens=3)
    run(engine)
    for rid in ("a", "b"):
        submit(engine, rid + " " + SYSTEM, rid, max_new_tokens=20)
    results: dict = {}
    collect(results, engine.step())
    scheduler = engine.scheduler
    assert scheduler.cache.cells_cached > 0 and len(scheduler.running) == 2
    assert scheduler.make_room() and scheduler.cache.cells_cached == 0 and scheduler.preempted_total == 0
    assert scheduler.make_room() and scheduler.preempted_total == 1  # then the newest running one
    run(engine, results)
    for rid in ("a", "b"):
        assert results[rid].text == reference(encode(rid + " " + SYSTEM), 20)
    check(engine)
