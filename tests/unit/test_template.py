import pytest

from easllm.chat.template import ChatTemplate, Conversation, PromptBuilder
from easllm.engine.backends.fake import CHATML
from easllm.engine.types import ModelInfo
from easllm.errors import InvalidRequest


def chars(text: str, add_special: bool) -> list[int]:
    return [ord(c) for c in text]


def builder(context: int = 4096, template: str | None = CHATML, no_template: bool = False) -> PromptBuilder:
    return PromptBuilder(ModelInfo("m", "fake", context, template), chars, no_template)


def text(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_chatml_with_system_history_and_prompt() -> None:
    conv = Conversation("How?", "Be brief.", (("Hi", "Hello!"),))
    built = builder().build(conv, max_round=5, max_new_tokens=10)
    assert text(built.token_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert built.rounds_used == 1 and built.max_new_tokens == 10


def test_only_the_last_max_round_rounds_are_used() -> None:
    history = tuple((f"q{i}", f"a{i}") for i in range(6))
    built = builder().build(Conversation("now", history=history), max_round=2, max_new_tokens=10)
    rendered = text(built.token_ids)
    assert "q3" not in rendered and "q4" in rendered and "q5" in rendered and built.rounds_used == 2


def test_max_round_zero_drops_history() -> None:
    built = builder().build(Conversation("now", history=(("q", "a"),)), max_round=0, max_new_tokens=1)
    assert "user\nq<" not in text(built.token_ids)


def test_oldest_rounds_dropped_to_fit_the_context() -> None:
    history = tuple((f"question {i} " + "x" * 100, f"answer {i}") for i in range(5))
    b = builder(context=400)
    built = b.build(Conversation("now", history=history), max_round=5, max_new_tokens=50)
    rendered = text(built.token_ids)
    assert "question 4" in rendered and "question 0" not in rendered
    assert len(built.token_ids) + 50 <= 400


def test_prompt_too_long_even_without_history_is_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        builder(context=100).build(Conversation("y" * 200), max_round=5, max_new_tokens=10)
    assert info.value.param == "prompt"


def test_max_new_tokens_capped_by_what_the_context_leaves() -> None:
    built = builder(context=100).build(Conversation("hi"), max_round=5, max_new_tokens=1000, no_template=True)
    assert built.max_new_tokens == 98


def test_no_template_sends_prompt_raw() -> None:
    built = builder().build(Conversation("raw text", "sys"), max_round=5, max_new_tokens=5, no_template=True)
    assert text(built.token_ids) == "raw text"


def test_model_without_template_is_raw_by_default() -> None:
    b = builder(template=None)
    assert b.no_template_default
    assert text(b.build(Conversation("go"), max_round=5, max_new_tokens=5).token_ids) == "go"


def test_template_cannot_escape_the_sandbox() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match=r"unsafe|not safely|access"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_raise_exception_in_template_is_a_400() -> None:
    tpl = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(InvalidRequest, match="user first"):
        tpl.render([{"role": "system", "content": "x"}])
