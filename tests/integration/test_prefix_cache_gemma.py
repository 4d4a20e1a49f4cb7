"""Prefix caching on gemma3-270m through HTTP: rounds, shared prefixes, a full cache, an abort.

Each test compares a server with the prefix cache (the default) with one started with
--no-prefix-cache: greedy answers must agree up to the first near-tie of the run without the
cache (the kernels are not batch-invariant; see test_batching_gemma.py), and `cached_tokens`
must say what was reused.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.test_batching_gemma import assert_same_up_to_a_near_tie, complete, wait_idle
from tests.servers import Server, running_server

pytestmark = pytest.mark.integration

FLAGS = ["--model-path", "gemma3-270m", "--threads", "2", "--ctx-size", "512", "--kv-size", "1024",
         "--max-batch", "8", "--max-batch-tokens", "64", "--max-new-tokens", "64"]  # fmt: skip
STORY = (
    "The old lighthouse stood at the end of the harbour wall, and every evening the keeper climbed "
    "its hundred and twelve steps to light the lamp. "
)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(FLAGS, tmp_path_factory.mktemp("cached")) as server:
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server([*FLAGS, "--no-prefix-cache"], tmp_path_factory.mktemp("plain")) as server:
        yield server


def details(server: Server) -> dict:
    return wait_idle(server)["details"]


def at_once(ask: Callable[[str], dict], keys: list[str]) -> dict[str, dict]:
    """ask(key) for every key, all at once; the answers by key."""
    with ThreadPoolExecutor(len(keys)) as pool:
        return dict(zip(keys, pool.map(ask, keys), strict=True))


def test_each_round_reuses_the_whole_previous_sequence_and_answers_as_without_the_cache(
    cached: Server, plain: Server
) -> None:
    texts = {"cached": STORY, "plain": STORY}
    previous_prompt = 0
    for turn in ("One night", "The next morning", "Years later", "In the end"):
        got = {}
        for name, server in (("cached", cached), ("plain", plain)):
            texts[name] += f" {turn},"
            got[name] = complete(server, texts[name], tokens=12)
            texts[name] += got[name]["text"]
        usage = got["cached"]["usage"]
        # round N+1 finds round N's prompt and answer (all but its last token, never fed)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= previous_prompt, usage
        assert got["plain"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert_same_up_to_a_near_tie(got["plain"], got["cached"], turn)
        if got["plain"]["tokens"] != got["cached"]["tokens"]:
            break  # a near-tie: the two conversations are no longer the same text
        previous_prompt = usage["prompt_tokens"]
    assert previous_prompt > 0
    eas = requests.post(
        cached.url, json={"prompt": texts["cached"], "max_new_tokens": 2}, headers=cached.headers()
    )
    assert eas.status_code == 200 and eas.json()["usage"]["cached_tokens"] > 0, eas.text
    d = details(cached)
    assert d["kv_cells_used"] == d["kv_cells_cached"] > 0 and d["prefix_cache_hits_total"] > 0
    metrics = requests.get(f"{cached.url}/metrics", headers=cached.headers(), timeout=10).text
    assert "easllm_prefix_cache_hits_total" in metrics and "easllm_kv_cache_cached_cells" in metrics


def test_eight_concurrent_requests_share_one_copy_of_their_prefix(cached: Server, plain: Server) -> None:
    prefix = "Rules of the harbour. " + STORY * 3
    questions = ["Who", "What", "Where", "When", "Why", "How", "Which", "Whose"]
    solo = {q: complete(plain, f"{prefix}{q}", tokens=8) for q in questions}
    before = details(cached)
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], cached.health()["engine"]["details"]["kv_cells_used"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    batched = at_once(lambda q: complete(cached, f"{prefix}{q}", tokens=8), questions)
    done.set()
    watcher.join()
    for q in questions:
        assert_same_up_to_a_near_tie(solo[q], batched[q], q)
    prompt = solo["Who"]["usage"]["prompt_tokens"]
    hits = sorted(batched[q]["usage"]["prompt_tokens_details"]["cached_tokens"] for q in questions)
    assert hits[0] < prompt - 4 <= min(hits[1:]), hits  # the others waited for the first one's prefix
    one_copy = prompt + 8 * (2 + 8)  # the prefix once, each question and answer
    assert peak[0] - before["kv_cells_cached"] <= 1.3 * one_copy or peak[0] <= 1.3 * one_copy, (
        peak,
        one_copy,
    )


def test_a_full_kv_cache_evicts_cached_prefixes_and_serves_everyone(cached: Server) -> None:
    prompts = [f"Chapter {i}. " + STORY * 4 for i in range(8)]  # ~8 x 170 tokens: more than 1024
    for p in prompts:
        assert complete(cached, p, tokens=4)["text"]
    d = details(cached)
    assert d["kv_cells_used"] <= d["kv_cells_total"] == 1024 and d["kv_cells_used"] == d["kv_cells_cached"]
    results = at_once(lambda p: complete(cached, p + " Then", tokens=8), prompts[-4:])
    assert all(results[p]["finish_reason"] in ("length", "stop") for p in prompts[-4:])
    assert sum(results[p]["usage"]["prompt_tokens_details"]["cached_tokens"] for p in prompts[-4:]) > 0
    assert details(cached)["kv_cells_used"] <= 1024


def test_abort_mid_prefill_leaves_a_consistent_cache(cached: Server, plain: Server) -> None:
    prompt = "A long letter. " + STORY * 9  # ~450 tokens: 7 steps of 64 prompt tokens
    aborted = wait_idle(cached)["aborted_total"]
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    with contextlib.suppress(requests.exceptions.ReadTimeout):  # hung up while the prompt is computed
        requests.post(f"{cached.url}/v1/completions", json=body, headers=cached.headers(), timeout=0.5)
    deadline = time.monotonic() + 30
    while cached.health()["engine"]["aborted_total"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    d = details(cached)
    assert d["kv_cells_used"] == d["kv_cells_cached"] <= d["kv_cells_total"]
    again, solo = complete(cached, prompt, tokens=8), complete(plain, prompt, tokens=8)
    assert_same_up_to_a_near_tie(solo, again, "after the abort")
