"""The OpenAI API of `easllm serve` with the bundled base model gemma3-270m, through the `openai` SDK."""

import json
import time

import httpx
import numpy as np
import openai
import pytest
from llama_cpp import Llama

from easllm.config import easllm_home
from easllm.models.resolve import resolve_model
from tests.servers import Server

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(gemma: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gemma.url}/v1", api_key=gemma.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Llama:
    path = resolve_model("gemma3-270m", easllm_home(), print).path
    return Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def features(client: openai.OpenAI) -> list[str]:
    return client.models.list().data[0].model_extra["features"]  # type: ignore[index]


def test_models_names_the_served_model(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == "gemma3-270m" and model.owned_by == "easllm"
    extra = model.model_extra or {}
    assert extra["engine"] == "llamacpp" and extra["context_length"] >= 2048
    assert client.models.retrieve("gemma3-270m").id == "gemma3-270m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_greedy_completion_usage_matches_the_tokenizer(client: openai.OpenAI, tokenizer: Llama) -> None:
    reply = client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    prompt_ids = tokenizer.tokenize(PROMPT.encode(), add_bos=True, special=True)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 8
    again = client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text


def test_streamed_completion_equals_the_greedy_reply(client: openai.OpenAI) -> None:
    fields = {"model": "gemma3-270m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**fields).choices[0].text
    stream = client.completions.create(**fields, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1


def test_echo_stop_and_prompt_list(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="gemma3-270m", prompt=[PROMPT, "1, 2, 3,"], max_tokens=10, temperature=0, echo=True, stop=[","]
    )
    first, second = reply.choices
    assert first.text.startswith(PROMPT) and second.text.startswith("1, 2, 3,")
    assert "," not in second.text[len("1, 2, 3,") :], "the stop string ends the answer and is not included"
    assert second.finish_reason == "stop"


def test_logprobs_or_a_clear_refusal(client: openai.OpenAI, features: list[str]) -> None:
    fields = {"model": "gemma3-270m", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 3}
    if "logprobs" not in features:
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(**fields)
        pytest.skip("the llama.cpp engine does not report logprobs yet (waiting on the batching engine)")
    reply = client.completions.create(**fields)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == reply.choices[0].text
    assert all(value <= 0 for value in lp.token_logprobs)
    assert all(
        len(top) <= 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-4
        for i, top in enumerate(lp.top_logprobs)
    )


def test_chat_on_a_base_model_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in str(caught.value) and caught.value.body["param"] == "messages"  # type: ignore[index]


def test_wrong_key_is_401_and_bad_fields_are_400(gemma: Server, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=f"{gemma.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gemma3-270m", prompt=PROMPT, temperature=5)
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="gemma3-270m", prompt=[[1, 2, 3]])
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]


def test_client_disconnect_aborts_the_stream(gemma: Server) -> None:
    before = gemma.health()["engine"]["aborted_total"]
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "temperature": 0.8}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{gemma.url}/v1/completions", json=body, headers=gemma.headers()) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    deadline = time.monotonic() + 30
    while gemma.health()["engine"]["aborted_total"] == before:
        assert time.monotonic() < deadline, "the engine never aborted the abandoned stream"
        time.sleep(0.1)


def test_embeddings_with_the_sdk(client: openai.OpenAI) -> None:
    texts = [
        "How do I reset my password?",
        "What are the steps to change my password?",
        "Bananas are yellow.",
    ]
    reply = client.embeddings.create(model="multilingual-e5-small", input=texts)  # the SDK asks for base64
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert reply.model == "multilingual-e5-small"
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 3
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > unrelated + 0.05
    floats = client.embeddings.create(model="x", input=texts[0], encoding_format="float").data[0].embedding
    # the same vector either way, up to bf16 rounding (a text alone is not padded as in a batch of three)
    assert np.allclose(floats, vectors[0], atol=5e-3) and float(np.dot(floats, vectors[0])) > 0.9999
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input=[[101, 2023]])
