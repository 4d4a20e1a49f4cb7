"""Continuous batching on llama.cpp with the bundled gemma3-270m: many streams at once.

llama.cpp's CPU kernels are not batch-invariant: the same sequence's logits move by up to ~0.7
depending on what else is in the batch (measured; llama-server behaves the same). So a greedy
stream decoded in a batch equals its solo run token for token until the solo run had a near-tie
between its top two tokens; a scheduling bug (a wrong slot, position or KV cell) breaks that at
once. These tests check exactly that, with the solo run's logprobs as the judge.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from easllm.config import EngineConfig, easllm_home
from easllm.engine.backends.llamacpp import LlamaCppEngine
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams
from easllm.models.resolve import resolve_model
from tests.servers import Server, running_server

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "In 1492, Columbus",
    "Water boils at",
]
TOKENS = 16
NEAR_TIE = 1.5  # nats between the solo run's choice and the batched run's, where they part


def complete(server: Server, prompt: str, stream: bool = False, tokens: int = TOKENS) -> dict:
    """Greedy /v1/completions with logprobs: {"tokens", "top", "text", "finish_reason", "usage"}."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": 5, "stream": stream}
    r = requests.post(
        f"{server.url}/v1/completions", json=body, headers=server.headers(), stream=stream, timeout=300
    )
    assert r.status_code == 200, r.text
    choices = [r.json()["choices"][0]] if not stream else [
        json.loads(line[6:])["choices"][0]
        for line in r.iter_lines(decode_unicode=True)
        if line.startswith("data: {")
    ]  # fmt: skip
    out: dict = {"tokens": [], "top": [], "text": "", "finish_reason": None}
    out["usage"] = None if stream else r.json()["usage"]
    for c in choices:
        out["text"] += c["text"]
        out["finish_reason"] = c["finish_reason"] or out["finish_reason"]
        if c.get("logprobs"):
            out["tokens"] += c["logprobs"]["tokens"]
            out["top"] += c["logprobs"]["top_logprobs"]
    return out


def assert_same_up_to_a_near_tie(solo: dict, batched: dict, prompt: str) -> None:
    a, b = solo["tokens"], batched["tokens"]
    k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if k is None:
        assert a == b and solo["text"] == batched["text"], prompt
        return
    top = solo["top"][k]
    assert b[k] in top, f"{prompt!r}: token {k} {b[k]!r} is not even in the solo top 5 {top}"
    assert top[a[k]] - top[b[k]] < NEAR_TIE, f"{prompt!r}: parted at token {k} without a near-tie: {top}"


def wait_idle(server: Server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        engine = server.health()["engine"]
        if engine["running"] == 0 and engine["waiting"] == 0:
            return engine
        assert time.monotonic() < deadline, engine
        time.sleep(0.05)


def test_concurrent_greedy_streams_give_each_request_its_solo_answer(gemma: Server) -> None:
    solo = {p: complete(gemma, p) for p in PROMPTS}
    batched: dict[str, dict] = {}
    threads = [
        threading.Thread(target=lambda p=p: batched.update({p: complete(gemma, p, True)})) for p in PROMPTS
    ]
    for t in threads:
        t.start()
    most_running = 0
    while any(t.is_alive() for t in threads):
        most_running = max(most_running, gemma.health()["engine"]["running"])
        time.sleep(0.05)
    assert most_running >= 4, "the requests were decoded together"
    for p in PROMPTS:
        assert len(batched[p]["tokens"]) == len(solo[p]["tokens"]) or batched[p]["finish_reason"] == "stop"
        assert_same_up_to_a_near_tie(solo[p], batched[p], p)
    engine = wait_idle(gemma)
    assert engine["details"]["kv_cells_used"] == engine["details"]["kv_cells_cached"]  # cached prefixes
    assert engine["details"]["steps"] > 0


def test_aborting_4_of_8_streams_frees_their_kv_cells_and_the_others_finish_right(gemma: Server) -> None:
    survivors = PROMPTS[:4]
    solo = {p: complete(gemma, p) for p in survivors}
    before = wait_idle(gemma)
    headers = gemma.headers()
    doomed = []
    for prompt in PROMPTS[2:6]:  # long answers, hung up on after their first chunks
        body = {"prompt": prompt, "max_new_tokens": 200, "temperature": 0, "use_stream_chat": True}
        r = requests.post(gemma.url, json=body, headers=headers, stream=True, timeout=120)
        chunks = r.iter_lines(delimiter=b"\0")
        next(chunks)
        doomed.append((r, chunks))
    batched: dict[str, dict] = {}
    threads = [
        threading.Thread(target=lambda p=p: batched.update({p: complete(gemma, p, True)})) for p in survivors
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while gemma.health()["engine"]["running"] < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    during = gemma.health()["engine"]
    assert during["running"] >= 6 and during["details"]["kv_cells_used"] > 0, during
    for r, chunks in doomed:
        next(chunks)  # mid-stream
        r.close()
    for t in threads:
        t.join()
    for p in survivors:
        assert batched[p]["finish_reason"] in ("length", "stop") and batched[p]["text"], p
        assert_same_up_to_a_near_tie(solo[p], batched[p], p)
    after = wait_idle(gemma)
    assert after["aborted_total"] == before["aborted_total"] + 4
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["details"]["kv_cells_used"] == after["details"]["kv_cells_cached"]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sequence at a time and a queue of one: the third concurrent request is refused."""
    args = ["--model-path", "gemma3-270m", "--threads", "2", "--max-batch", "1", "--max-queue", "1"]
    with running_server(args, tmp_path_factory.mktemp("small")) as server:
        yield server


def test_a_full_queue_answers_503_with_retry_after(small_server: Server) -> None:
    # long enough to still be running when the third request comes, however slow the machine
    body = {"prompt": "Once upon a time", "max_new_tokens": 2000, "temperature": 0, "use_stream_chat": True}
    first = requests.post(
        small_server.url, json=body, headers=small_server.headers(), stream=True, timeout=60
    )
    chunks = first.iter_lines(delimiter=b"\0")  # held: a dropped iterator closes the connection
    next(chunks)
    second: dict = {}
    waiter = threading.Thread(
        target=lambda: second.update(
            r=requests.post(
                small_server.url, json={**body, "max_new_tokens": 2}, headers=small_server.headers()
            )
        )
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while small_server.health()["engine"]["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = requests.post(small_server.url, json={"prompt": "hi"}, headers=small_server.headers(), timeout=30)
    assert third.status_code == 503 and third.headers.get("Retry-After")
    assert small_server.health()["engine"]["running"] == 1, "the first request is still running"
    first.close()
    waiter.join()
    assert second["r"].status_code == 200


# -- the engine in-process, for what HTTP does not show: grammars --


@pytest.fixture(scope="module")
def gguf() -> Path:
    return resolve_model("gemma3-270m", easllm_home(), print).path


YES_NO = r"""root ::= "{" ws "\"answer\":" ws ("\"yes\"" | "\"no\"") ws "," ws count ws "}"
count ::= "\"count\":" ws [1-9] [0-9]?
ws ::= [ ]?"""


def test_grammar_constrained_answers_parse_while_batched_with_free_ones(gguf: Path) -> None:
    async def main() -> list[tuple[str, FinishReason | None]]:
        engine = LlamaCppEngine(gguf, EngineConfig(ctx_size=1024, max_batch=4, threads=2), "gemma3-270m")
        await engine.start()
        try:
            prompt = engine.tokenize("Is the sky blue? Answer in JSON:")

            async def run(params: SamplingParams) -> tuple[str, FinishReason | None]:
                text, reason = "", None
                async for d in engine.generate(GenerationRequest(prompt, params)):
                    text, reason = text + d.text, d.finish_reason
                return text, reason

            results = await asyncio.gather(
                run(SamplingParams(max_new_tokens=40, temperature=0.8, seed=1, grammar=YES_NO)),
                run(SamplingParams(max_new_tokens=40, temperature=0.0, grammar=YES_NO)),
                run(SamplingParams(max_new_tokens=12, temperature=0.0)),
            )
            details = engine.health().details
            assert details["kv_cells_used"] == details["kv_cells_cached"]
            return results
        finally:
            await engine.close()

    *constrained, (free, _) = asyncio.run(main())
    for text, reason in constrained:
        doc = json.loads(text)
        assert doc["answer"] in ("yes", "no") and 1 <= doc["count"] <= 99 and reason is FinishReason.STOP
    assert free and not free.lstrip().startswith('{"answer"')
