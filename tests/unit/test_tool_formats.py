"""Tool calling below HTTP: the call formats, the grammar, the checks, the stream splitter."""

import json

import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from easllm.chat.template import ChatTemplate
from easllm.engine.backends.fake import CHATML
from easllm.errors import InvalidRequest
from easllm.tools.formats import (
    MAX_CALLS,
    HermesFormat,
    Llama3JsonFormat,
    MalformedCall,
    MistralFormat,
    RawCall,
    format_for_template,
)
from easllm.tools.grammar import tool_call_grammar
from easllm.tools.session import renders_tools, tool_session
from easllm.tools.types import ChoiceMode, Tool, ToolChoice, ToolRequest
from easllm.tools.validate import check_parameters, checked_calls
from tests.tool_templates import HERMES_TEMPLATE

WEATHER = Tool(
    "get_weather",
    "Weather of a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool("get_time", "", {"type": "object", "properties": {}})
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'


def test_hermes_keeps_the_text_before_the_call_and_parses_each_call() -> None:
    text = f"Let me look.\n{CALL}\n{CALL.replace('Tokyo', 'Paris')}"
    parsed = HermesFormat().parse(text)
    assert parsed is not None
    assert parsed.content == "Let me look.\n"
    assert parsed.calls == [
        RawCall("get_weather", {"city": "Tokyo"}),
        RawCall("get_weather", {"city": "Paris"}),
    ]


def test_hermes_text_without_a_call_is_no_call_and_a_broken_call_is_malformed() -> None:
    assert HermesFormat().parse("Tokyo is sunny.") is None
    with pytest.raises(MalformedCall):
        HermesFormat().parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>')
    with pytest.raises(MalformedCall):
        HermesFormat().parse('<tool_call>\n{"arguments": {}}\n</tool_call>')


def test_llama3_json_calls_use_parameters_and_may_follow_the_python_tag() -> None:
    fmt = Llama3JsonFormat()
    parsed = fmt.parse(
        '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", '
        '"parameters": {"city": "Oslo"}}'
    )
    assert parsed is not None
    assert [c.name for c in parsed.calls] == ["get_time", "get_weather"]
    assert fmt.parse("It is 3 pm.") is None


def test_mistral_parses_both_the_array_and_the_args_forms_and_uses_nine_character_ids() -> None:
    fmt = MistralFormat()
    parsed = fmt.parse('Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert parsed is not None and parsed.content == "Sure. "
    assert parsed.calls == [RawCall("get_weather", {"city": "Rome"})]
    parsed = fmt.parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}')
    assert parsed is not None and [c.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert len(fmt.new_id()) == 9


def test_the_format_is_found_in_the_template() -> None:
    assert format_for_template(HERMES_TEMPLATE) == "hermes"
    assert format_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert format_for_template("{{ '<|python_tag|>' }}") == "llama3_json"
    assert format_for_template(CHATML) is None


@pytest.mark.parametrize("fmt", [HermesFormat(), Llama3JsonFormat(), MistralFormat()])
def test_every_format_grammar_compiles_as_gbnf(fmt) -> None:
    gbnf = tool_call_grammar(fmt, [WEATHER, TIME], parallel=True)
    assert gbnf.startswith("root ::= ")
    assert '"\\"get_weather\\""' in gbnf  # the names are constants of the grammar
    LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp's own parser accepts it


def test_parallel_calls_are_bounded_by_the_grammar() -> None:
    assert f"{{0,{MAX_CALLS - 1}}}" in tool_call_grammar(HermesFormat(), [WEATHER], parallel=True)
    assert "{0," not in tool_call_grammar(HermesFormat(), [WEATHER], parallel=False).splitlines()[0]


def test_calls_must_name_an_offered_tool_with_arguments_its_schema_accepts() -> None:
    new_id = iter(["a", "b"]).__next__
    calls = checked_calls([RawCall("get_weather", {"city": "Tokyo"})], [WEATHER], new_id)
    assert calls is not None and json.loads(calls[0].arguments) == {"city": "Tokyo"} and calls[0].id == "a"
    assert checked_calls([RawCall("get_stock", {})], [WEATHER], new_id) is None
    assert checked_calls([RawCall("get_weather", {"town": "x"})], [WEATHER], new_id) is None
    assert checked_calls([RawCall("get_weather", {"city": 3})], [WEATHER], new_id) is None


@pytest.mark.parametrize(
    "parameters",
    [[1, 2], "object", {"type": "string"}, {"type": "object", "properties": 5}, {"type": "objekt"}],
)
def test_parameters_that_are_not_an_object_schema_are_refused(parameters) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_parameters(parameters, "tools[0]")
    assert err.value.param == "tools"


def test_deeply_nested_parameters_are_refused() -> None:
    schema: dict = {"type": "object"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(InvalidRequest, match="deeper"):
        check_parameters(schema, "tools[0]")


def test_a_converter_failure_without_a_message_is_named_by_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_cpp import llama_grammar

    from easllm.protocol.json_grammar import json_schema_grammar

    def fail(*_: object, **__: object) -> None:
        raise KeyError()

    monkeypatch.setattr(llama_grammar.SchemaConverter, "visit", fail)
    monkeypatch.setattr(llama_grammar, "json_schema_to_gbnf", fail)
    with pytest.raises(InvalidRequest, match=r"grammar: KeyError$") as err:
        tool_call_grammar(HermesFormat(), [WEATHER], parallel=False)
    assert err.value.param == "tools"
    with pytest.raises(InvalidRequest, match=r"grammar: KeyError$") as err:
        json_schema_grammar({"type": "object"})
    assert err.value.param == "response_format"


def session(choice: ToolChoice | None = None, features=frozenset({"grammar"})):
    request = ToolRequest((WEATHER, TIME), choice or ToolChoice())
    result = tool_session(request, ChatTemplate(HERMES_TEMPLATE), features, "fake")
    assert result is not None
    return result


def test_the_template_shows_the_tools_or_tools_are_refused() -> None:
    assert renders_tools(ChatTemplate(HERMES_TEMPLATE))
    assert not renders_tools(ChatTemplate(CHATML))
    with pytest.raises(InvalidRequest) as err:
        tool_session(ToolRequest((WEATHER,)), ChatTemplate(CHATML), {"grammar"}, "fake")
    assert err.value.param == "tools"


def test_required_needs_a_grammar_and_auto_uses_a_lazy_one_where_the_engine_has_it() -> None:
    with pytest.raises(InvalidRequest) as err:
        session(ToolChoice(ChoiceMode.REQUIRED), features=frozenset())
    assert err.value.param == "tool_choice"
    required = session(ToolChoice(ChoiceMode.REQUIRED))
    assert required.grammar is not None and required.grammar_triggers == ()
    assert session(features=frozenset()).grammar is None
    lazy = session(features=frozenset({"grammar", "grammar_triggers"}))
    assert lazy.grammar is not None and lazy.grammar_triggers == ("<tool_call>",)
    named = tool_session(
        ToolRequest((WEATHER, TIME), ToolChoice(ChoiceMode.NAMED, "get_time"), parallel=False),
        ChatTemplate(HERMES_TEMPLATE),
        {"grammar"},
        "fake",
    )
    assert named is not None and named.grammar is not None
    assert "get_time" in named.grammar and "get_weather" not in named.grammar


def test_an_invalid_call_is_returned_as_text() -> None:
    s = session()
    bad = CALL.replace("get_weather", "get_stock")
    assert s.answer(bad).calls == [] and s.answer(bad).content == bad
    broken = CALL[:-20]
    assert s.answer(broken).content == broken
    good = s.answer("Checking. " + CALL)
    assert good.content == "Checking." and [c.name for c in good.calls] == ["get_weather"]


def test_the_stream_splitter_passes_content_on_and_holds_a_call_back() -> None:
    stream = session().stream()
    text = "Checking. " + CALL
    sent = "".join(stream.feed(ch) for ch in text)  # one character per delta
    assert sent == "Checking. "
    answer = stream.finish()
    assert [c.name for c in answer.calls] == ["get_weather"]


def test_the_stream_splitter_releases_text_that_only_looked_like_a_call() -> None:
    stream = session().stream()
    sent = stream.feed("a <tool") + stream.feed("box> b")
    assert sent == "a <toolbox> b" and stream.finish().content is None
    stream = session().stream()
    assert stream.feed("x <tool_") == "x "
    assert stream.finish().content == "<tool_"


def test_hermes_takes_a_bare_or_fenced_call_object_as_small_models_write_it() -> None:
    fenced = 'Here:\n```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Tokyo"\n  }\n}\n```'
    parsed = HermesFormat().parse(fenced)
    assert parsed is not None and parsed.content == "Here:\n"
    assert parsed.calls == [RawCall("get_weather", {"city": "Tokyo"})]
    parsed = HermesFormat().parse('{"name": "get_time", "arguments": {}}')
    assert parsed is not None and parsed.calls == [RawCall("get_time", {})]
    assert HermesFormat().parse('```python\nprint({"a": 1})\n```') is None


def test_the_stream_splitter_holds_a_fenced_call_back_and_releases_other_code() -> None:
    stream = session().stream()
    text = 'Sure.\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    assert "".join(stream.feed(ch) for ch in text) == "Sure.\n"
    assert [c.name for c in stream.finish().calls] == ["get_weather"]
    stream = session().stream()
    code = "```python\nx = {1: 2}\n```"
    sent = "".join(stream.feed(ch) for ch in code)
    assert sent + (stream.finish().content or "") == code and sent.startswith("```python")


def test_the_grammar_allows_indented_json_and_the_call_is_checked_against_it() -> None:
    gbnf = tool_call_grammar(HermesFormat(), [WEATHER], parallel=False)
    assert 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}' in gbnf
