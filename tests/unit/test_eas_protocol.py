import json

import pytest

from easllm.errors import InvalidRequest
from easllm.protocol.eas import EasRequest, parse_eas_body

JSON = "application/json"


def parse(obj: object, content_type: str | None = JSON) -> EasRequest | str:
    return parse_eas_body(json.dumps(obj).encode(), content_type)


def test_plain_text_body_is_the_prompt() -> None:
    assert parse_eas_body(b"Tell me a joke", "application/x-www-form-urlencoded") == "Tell me a joke"
    assert parse_eas_body("日本の首都は".encode(), None) == "日本の首都は"


def test_json_object_without_content_type_is_structured() -> None:
    req = parse({"prompt": "hi"}, None)
    assert isinstance(req, EasRequest) and req.prompt == "hi"


def test_json_scalar_without_content_type_is_a_prompt() -> None:
    assert parse_eas_body(b"42", "text/plain") == "42"


def test_every_field_of_the_table() -> None:
    req = parse(
        {
            "prompt": "How to install it?",
            "system_prompt": "Act like a programmer",
            "history": [["q1", "a1"], ("q2", "a2")],
            "max_new_tokens": 64,
            "use_stream_chat": "True",
            "temperature": 0.8,
            "top_k": 10,
            "top_p": 0.8,
            "do_sample": "False",
            "use_cache": True,
            "stop": ["\n\n"],
            "repetition_penalty": 1.1,
            "seed": 7,
            "langchain": False,
            "no_template": "true",
        }
    )
    assert isinstance(req, EasRequest)
    assert req.history == [("q1", "a1"), ("q2", "a2")]
    assert req.use_stream_chat is True and req.do_sample is False and req.no_template is True
    assert (req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed) == (64, 0.8, 10, 0.8, 7)
    assert req.stop == ["\n\n"]


def test_keys_are_whitespace_stripped_and_unknown_keys_ignored() -> None:
    req = parse({" prompt": "x", "max_new_tokens ": 5, "frobnicate": 1})
    assert isinstance(req, EasRequest) and req.prompt == "x" and req.max_new_tokens == 5


def test_aliases() -> None:
    req = parse({"input_ids": "hello", "stop_sequences": "END"})
    assert isinstance(req, EasRequest) and req.prompt == "hello" and req.stop == ["END"]


def test_published_default_history_of_one_empty_round() -> None:
    req = parse({"prompt": "x", "history": [[]]})
    assert isinstance(req, EasRequest) and req.history == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens"),
        ({"prompt": "x", "history": "q a"}, "history"),
        ({"prompt": "x", "history": [["only one"]]}, "history"),
        ({"prompt": "x", "history": [["q", "a", "extra"]]}, "history"),
        ({"prompt": "x", "history": [[1, 2]]}, "history"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "use_stream_chat": "maybe"}, "use_stream_chat"),
    ],
)
def test_bad_fields_are_named(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.param == param


def test_invalid_json_with_json_content_type() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_eas_body(b'{"prompt": ', JSON)
    assert info.value.param == "body" and "invalid JSON" in info.value.message


def test_json_array_with_json_content_type() -> None:
    with pytest.raises(InvalidRequest, match="object"):
        parse_eas_body(b"[1, 2]", JSON)


def test_empty_body() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_eas_body(b"  \n", None)
    assert info.value.param == "prompt"
