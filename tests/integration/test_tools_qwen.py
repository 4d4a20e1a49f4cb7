"""Tool calling on the bundled Qwen2.5 GGUF (llama.cpp engine) through the `openai` SDK and LangChain."""

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from llama_cpp import Llama

from easllm.config import easllm_home
from easllm.engine.backends.llamacpp_grammar import LlamaGrammar
from easllm.models.resolve import resolve_model
from easllm.tools.formats import HermesFormat
from easllm.tools.grammar import tool_call_grammar
from easllm.tools.types import Tool
from tests.servers import Server, running_server

pytestmark = pytest.mark.integration

MODEL = "qwen2.5-0.5b-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. Asia/Tokyo"}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("qwen-tools")
    args = ["--max-new-tokens", "128", "--threads", "2", "--api-only", "--temperature", "0"]
    with running_server(args, tmp) as server:
        yield server


@pytest.fixture(scope="module")
def client(qwen: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen.url}/v1", api_key=qwen.token, max_retries=0, timeout=180)


def ask(client: openai.OpenAI, question: str, **fields: object):
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, **fields)  # type: ignore[arg-type]


def arguments(call) -> dict:
    return json.loads(call.function.arguments)


def test_models_says_tools_with_required(client: openai.OpenAI) -> None:
    card = client.models.list().data[0].model_extra
    assert {"tools", "tool_choice_required"} <= set(card["features"])  # type: ignore[index]
    assert card["tool_call_parser"] == "hermes"  # type: ignore[index]


def test_auto_call_then_the_answer_from_the_tool_result(client: openai.OpenAI) -> None:
    messages: list = [{"role": "user", "content": "What is the weather in Tokyo right now?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and "tokyo" in arguments(call)["city"].lower()
    messages += [
        choice.message,
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'},
    ]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    # The result reached the model (the 0.5B model mostly restates it rather than answering).
    assert "21" in (final.choices[0].message.content or "")


def test_streamed_call_is_rebuilt_by_the_sdk_accumulator(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=TOOLS, stream_options={"include_usage": True}
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and "paris" in arguments(call)["city"].lower()
    assert final.choices[0].finish_reason == "tool_calls"
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 2 and pieces[0].choices[0].delta.tool_calls[0].id == call.id
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_required_and_named_always_give_a_valid_call(client: openai.OpenAI) -> None:
    reply = ask(client, "Tell me a joke about cats.", tool_choice="required")
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in reply.choices[0].message.tool_calls or []:
        assert call.function.name in {"get_weather", "get_time"}
        assert set(arguments(call)) == {"city"} if call.function.name == "get_weather" else {"timezone"}
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = ask(client, "What time is it in Tokyo?", tool_choice=named)
    [call] = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and isinstance(arguments(call)["timezone"], str)


@pytest.mark.slow
def test_parallel_calls_in_one_answer(client: openai.OpenAI) -> None:
    reply = ask(
        client, "What is the weather in Tokyo and what is the weather in Paris?", tool_choice="required"
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert {arguments(c)["city"].lower() for c in calls} == {"tokyo", "paris"}
    assert len({c.id for c in calls}) == 2


@tool
def get_weather(city: str) -> str:
    """Get the current weather of a city."""
    return json.dumps({"city": city, "temp_c": 21, "sky": "sunny"})


@tool
def get_time(timezone: str) -> str:
    """Get the current local time in an IANA time zone, e.g. Asia/Tokyo."""
    return json.dumps({"timezone": timezone, "time": "14:05"})


@pytest.fixture(scope="module")
def chat_model(qwen: Server) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL, base_url=f"{qwen.url}/v1", api_key=qwen.token, temperature=0, max_retries=0, timeout=180
    )


def test_langchain_bind_tools_gives_tool_calls(chat_model: ChatOpenAI) -> None:
    message = chat_model.bind_tools([get_weather, get_time]).invoke("What is the weather in Berlin?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and "berlin" in call["args"]["city"].lower()
    assert call["id"]


def run_agent(model, tools: dict, question: str, steps: int = 3) -> tuple[list[str], object]:
    """A plain agent loop over `bind_tools`: run the tools the model calls until it answers."""
    history: list = [HumanMessage(question)]
    called = []
    for _ in range(steps):
        message = model.invoke(history)
        history.append(message)
        if not message.tool_calls:
            return called, message
        for call in message.tool_calls:
            called.append(call["name"])
            history.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    raise AssertionError(f"no answer after {steps} steps: {called}")


@pytest.mark.slow
def test_langchain_agent_runs_two_tools_then_answers(chat_model: ChatOpenAI) -> None:
    # The bundled 0.5B model calls one tool per task: asked for two things at once, or for the
    # next one after a tool result, it repeats its last call. So the agent gets two tasks, and
    # its "answer" after a tool result is often those repeated calls, cut by max_tokens: text.
    tools = {t.name: t for t in (get_weather, get_time)}
    model = chat_model.bind_tools(list(tools.values()))
    first, answer = run_agent(model, tools, "What is the weather in Tokyo right now?")
    assert first == ["get_weather"] and not answer.tool_calls and answer.content
    second, answer = run_agent(model, tools, "What is the local time in the Asia/Tokyo time zone?")
    assert second == ["get_time"] and not answer.tool_calls


@pytest.mark.slow
def test_langchain_streams_a_tool_call(chat_model: ChatOpenAI) -> None:
    model = chat_model.bind_tools([get_weather, get_time])
    merged = None
    for chunk in model.stream("What is the weather in Madrid?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    [call] = merged.tool_calls
    assert call["name"] == "get_weather" and "madrid" in call["args"]["city"].lower()


def test_the_lazy_grammar_frees_text_until_the_call_token_then_constrains_it() -> None:
    path = resolve_model(MODEL, easllm_home(), print).path
    model = Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = model._model.vocab
    n_vocab = model.n_vocab()
    tool = Tool(
        "get_time", "", {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}
    )
    gbnf = tool_call_grammar(HermesFormat(), [tool], parallel=False)
    grammar = LlamaGrammar(vocab, n_vocab, gbnf, ("<tool_call>",))

    def ids(text: str) -> list[int]:
        return model.tokenize(text.encode(), add_bos=False, special=True)

    for token in ids("Sure, let me check. "):
        assert grammar.allows(token)  # free text before the call
        grammar.accept(token)
    [opening] = ids("<tool_call>")
    grammar.accept(opening)
    assert not grammar.allows(ids("Hello")[0])  # inside the call only the grammar's text
    for token in ids('\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'):
        assert grammar.allows(token), model.detokenize([token])
        grammar.accept(token)
    assert grammar.allows(model.token_eos())
    grammar.close()
