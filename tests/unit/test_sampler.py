"""The per-sequence sampler: seeds, temperature, top-k, top-p, penalties, grammar and logprobs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from easllm.engine.sampler import NO_TOKEN, Sampler, _nucleus
from easllm.engine.types import SamplingParams
from tests.unit.fake_runner import FakeGrammar

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def draws(params: SamplingParams, logits: np.ndarray = LOGITS, n: int = 4000) -> Counter[int]:
    sampler = Sampler(params)
    return Counter(sampler.sample(logits).token for _ in range(n))


def test_greedy_takes_the_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits).token == 1
    assert Sampler(SamplingParams(temperature=1.0, top_k=1)).sample(logits).token == 1


def test_a_seed_gives_the_same_tokens_and_another_seed_others() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=50).astype(np.float32) for _ in range(40)]

    def tokens(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        out = []
        for row in rows:
            out.append(sampler.sample(row).token)
            sampler.accept(out[-1])
        return out

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_the_same_seed_samples_the_same_whatever_else_is_sampled_in_between() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.normal(size=50).astype(np.float32) for _ in range(20)]
    alone = Sampler(SamplingParams(temperature=0.8, seed=3))
    expected = [alone.sample(r).token for r in rows]
    a, b = Sampler(SamplingParams(temperature=0.8, seed=3)), Sampler(SamplingParams(temperature=0.8, seed=4))
    interleaved = []
    for r in rows:
        b.sample(r[::-1].copy())
        interleaved.append(a.sample(r).token)
    assert interleaved == expected


def test_temperature_one_follows_the_model_distribution() -> None:
    counts = draws(SamplingParams(temperature=1.0, seed=0))
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_low_temperature_sharpens_high_temperature_flattens() -> None:
    cold = draws(SamplingParams(temperature=0.2, seed=0))
    hot = draws(SamplingParams(temperature=2.0, seed=0))
    assert cold[0] / 4000 > 0.9
    assert 0.3 < hot[0] / 4000 < 0.45 and hot[3] / 4000 > 0.1


def test_top_k_keeps_only_the_k_most_likely() -> None:
    counts = draws(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    assert set(draws(SamplingParams(temperature=1.0, top_p=top_p, seed=0))) == kept


def test_nucleus_over_a_large_vocabulary_matches_a_full_sort() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(5000, 0.05))
    for p in (0.1, 0.5, 0.9, 0.99, 1.0):
        order = np.argsort(-probs, kind="stable")
        expected = order[: int(np.searchsorted(np.cumsum(probs[order]), p)) + 1]
        assert _nucleus(probs, p).tolist() == expected.tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = np.array([2.0, 1.5, -1.0, -1.2], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0])
    assert sampler.sample(logits).token == 1  # 2.0 / 2 = 1.0 < 1.5
    sampler.accept(1)  # 1.5 / 2 = 0.75 < 1.0
    assert sampler.sample(logits).token == 0
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[2])
    assert sampler._penalized(logits)[2] == pytest.approx(-2.0)  # negative: multiplied


def test_presence_and_frequency_penalties_count_only_the_answer() -> None:
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, presence_penalty=0.2, frequency_penalty=0.3)
    sampler = Sampler(params, prompt_ids=[0, 0, 0])
    assert sampler.sample(logits).token == 0, "prompt tokens are not penalised"
    sampler.accept(0)
    assert sampler._penalized(logits)[0] == pytest.approx(3.0 - 0.2 - 0.3)
    sampler.accept(0)
    assert sampler._penalized(logits)[0] == pytest.approx(3.0 - 0.2 - 0.6)
    assert sampler.sample(logits).token == 1
    assert sampler._penalized(logits)[1] == 2.5


def test_penalties_do_not_touch_the_callers_logits() -> None:
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=1.0, repetition_penalty=1.5), [1])
    sampler.accept(0)
    sampler.sample(logits)
    assert logits.tolist() == [3.0, 2.5, 0.0]


def test_grammar_masks_only_when_the_sampled_token_is_forbidden() -> None:
    logits = np.zeros(31, dtype=np.float32)
    logits[LETTER_A] = 5.0
    grammar = FakeGrammar("ab")
    sampler = Sampler(SamplingParams(temperature=0.0), grammar=grammar)
    assert sampler.sample(logits).token == LETTER_A and grammar.masks == 0
    logits[LETTER_A], logits[LETTER_C] = 1.0, 5.0  # "c" is forbidden
    assert sampler.sample(logits).token == LETTER_A and grammar.masks == 1
    hot = Sampler(SamplingParams(temperature=1.5, seed=1), grammar=FakeGrammar("ab"))
    assert {hot.sample(logits).token for _ in range(300)} <= {0, LETTER_A, LETTER_A + 1}


def test_a_grammar_that_allows_nothing_ends_the_sequence() -> None:
    class Nothing(FakeGrammar):
        def mask(self, logits: np.ndarray) -> np.ndarray:
            return np.full_like(logits, -np.inf)

    sampler = Sampler(SamplingParams(temperature=0.0), grammar=Nothing("a"))
    assert sampler.sample(np.arange(31, dtype=np.float32)).token == NO_TOKEN


def test_logprobs_are_the_models_before_penalties_and_temperature() -> None:
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    expected = logits - np.log(np.exp(logits).sum())
    sampler = Sampler(SamplingParams(temperature=0.7, seed=0, logprobs=2, frequency_penalty=5.0))
    sampler.accept(0)
    sample = sampler.sample(logits)
    assert sample.logprob == pytest.approx(expected[sample.token], abs=1e-5)
    assert [t for t, _ in sample.top] == [0, 1]
    assert [lp for _, lp in sample.top] == pytest.approx(expected[:2].tolist(), abs=1e-5)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits).logprob is None
    assert Sampler(SamplingParams(temperature=0.0, logprobs=0)).sample(logits).top == []


LETTER_A, LETTER_C = 2, 4
