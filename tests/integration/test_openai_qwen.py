"""The default chat model (Qwen2.5 0.5B GGUF) through the OpenAI API, with the `openai` SDK and LangChain."""

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from llama_cpp import Llama
from pydantic import BaseModel, Field

from easllm.config import easllm_home
from easllm.models.resolve import resolve_model
from tests.servers import Server, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "qwen2.5-0.5b-instruct"
SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France? Answer with one word."


class City(BaseModel):
    name: str
    country: str
    population: int = Field(ge=0)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("qwen-openai")
    with running_server(["--max-new-tokens", "96", "--threads", "2"], tmp) as server:
        yield server


@pytest.fixture(scope="module")
def client(qwen: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen.url}/v1", api_key=qwen.token, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def features(client: openai.OpenAI) -> list[str]:
    return client.models.list().data[0].model_extra["features"]  # type: ignore[index]


def ask(client: openai.OpenAI, **fields: object):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **fields)  # type: ignore[arg-type]


def test_chat_streamed_equals_non_streamed_and_usage_matches_the_tokenizer(client: openai.OpenAI) -> None:
    reply = ask(client)
    text = reply.choices[0].message.content or ""
    assert "paris" in text.lower() and reply.choices[0].finish_reason == "stop"
    assert "<|im_end|>" not in text
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    path = resolve_model(MODEL, easllm_home(), print).path
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    chatml = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt_tokens = len(vocab.tokenize(chatml.encode(), add_bos=False, special=True))
    answer_tokens = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
    assert reply.usage is not None and reply.usage.prompt_tokens == prompt_tokens
    assert abs(reply.usage.completion_tokens - (answer_tokens + 1)) <= 1  # + <|im_end|>
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stop_strings_and_max_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=["7"])
    text = reply.choices[0].message.content or ""
    assert "1" in text and "7" not in text and reply.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3  # type: ignore[union-attr]


def test_json_schema_output_parses_and_validates(client: openai.OpenAI, features: list[str]) -> None:
    messages = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Give the name, country and population of the capital of Japan."},
    ]
    if "grammar" not in features:
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.parse(model=MODEL, messages=messages, response_format=City)  # type: ignore[arg-type]
        pytest.skip("the llama.cpp engine does not take grammars yet (waiting on the batching engine)")
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format=City,
        temperature=0,
        max_tokens=96,
    )
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country
    loose = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=96,
    )
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


def test_penalties_are_applied_or_refused(client: openai.OpenAI, features: list[str]) -> None:
    if "penalties" not in features:
        with pytest.raises(openai.BadRequestError, match="presence_penalty"):
            ask(client, presence_penalty=0.5)
        return
    assert (
        "paris"
        in (ask(client, presence_penalty=0.5, frequency_penalty=0.5).choices[0].message.content or "").lower()
    )


def test_sdk_errors_are_typed(qwen: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{qwen.url}/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, n=0)
    assert caught.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 9000}])
    assert caught.value.body["param"] == "messages"  # type: ignore[index]


def test_langchain_chat_openai_invoke_and_stream(qwen: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{qwen.url}/v1", api_key=qwen.token, model=MODEL, temperature=0, max_retries=0
    )
    answer = llm.invoke([("system", SYSTEM), ("human", QUESTION)])
    assert "paris" in str(answer.content).lower()
    streamed = "".join(str(chunk.content) for chunk in llm.stream([("system", SYSTEM), ("human", QUESTION)]))
    assert streamed == answer.content
