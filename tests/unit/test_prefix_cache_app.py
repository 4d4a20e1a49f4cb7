"""cached_tokens and the prefix-cache counters through the API, over the batching engine's fake runner."""

from __future__ import annotations

import json

from easllm.config import ServerConfig
from tests.apps import serving
from tests.unit.fake_runner import FakeBatchingEngine, FakeRunner, encode

PROMPT = "the long instructions every request of this app starts with and then "


def complete(client, prompt: str, stream: bool = False) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["usage"]
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return events[-1]["usage"]


def test_completions_report_cached_tokens_and_metrics_count_them() -> None:
    engine = FakeBatchingEngine(FakeRunner(max_batch_tokens=64))
    with serving(ServerConfig(), engine) as client:
        first = complete(client, PROMPT + "one")
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        second = complete(client, PROMPT + "two", stream=True)
        shared = len(encode(PROMPT + "t"))  # "one" and "two" part after the shared letters
        assert second["prompt_tokens_details"] == {"cached_tokens": shared - 1}
        assert second["prompt_tokens"] == len(encode(PROMPT + "two"))
        health = client.get("/health").json()["engine"]["details"]
        assert health["kv_cells_cached"] == health["kv_cells_used"] > 0
        metrics = client.get("/metrics").text
        queries = len(encode(PROMPT + "one")) + len(encode(PROMPT + "two"))
        assert f"easllm_prefix_cache_queries_total {float(queries)}" in metrics
        assert f"easllm_prefix_cache_hits_total {float(shared - 1)}" in metrics


def test_without_the_prefix_cache_nothing_is_reported_cached() -> None:
    engine = FakeBatchingEngine(FakeRunner(max_batch_tokens=64, num_seq_ids=4), prefix_cache=False)
    with serving(ServerConfig(), engine) as client:
        for _ in range(2):
            assert complete(client, PROMPT)["prompt_tokens_details"] == {"cached_tokens": 0}
        assert client.get("/health").json()["engine"]["details"]["kv_cells_used"] == 0
