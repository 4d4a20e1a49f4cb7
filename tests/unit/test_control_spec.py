"""Service specs: names, fields, extra serve flags, tokens, and what an update may change."""

import pytest

from easllm.control.spec import ServiceSpec, merge_update, parse_spec
from easllm.errors import InvalidRequest


def test_minimal_spec_has_the_documented_defaults() -> None:
    spec = parse_spec({"name": "llm_demo001"})
    assert spec.model == "qwen2.5-0.5b-instruct" and spec.engine is None and spec.replicas == 1
    assert spec.resources.gpu == 0 and spec.resources.cpu is None and spec.token is None and spec.args == []


def test_full_spec_round_trips_through_json() -> None:
    data = {
        "name": "svc_2",
        "model": "gemma3-270m",
        "engine": "llamacpp",
        "replicas": 3,
        "resources": {"cpu": 2, "memory": 2048, "gpu": 0},
        "token": "s3cret-token",
        "args": ["--max-new-tokens", "64", "--temperature", "0"],
    }
    spec = parse_spec(data)
    assert ServiceSpec.model_validate_json(spec.model_dump_json()) == spec
    assert "token" not in spec.public() and spec.public()["resources"]["memory"] == 2048


@pytest.mark.parametrize("name", ["1abc", "has-dash", "", "a" * 64, "名前", "with space", "_lead"])
def test_bad_names_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_spec({"name": name})
    assert info.value.param == "name"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"name": "a", "replicas": 0}, "replicas"),
        ({"name": "a", "replicas": 17}, "replicas"),
        ({"name": "a", "engine": "magic"}, "engine"),
        ({"name": "a", "precision": "int3"}, "precision"),
        ({"name": "a", "resources": {"cpu": 0}}, "resources.cpu"),
        ({"name": "a", "resources": {"memory": 1}}, "resources.memory"),
        ({"name": "a", "resources": {"gpus": 1}}, "resources.gpus"),
        ({"name": "a", "token": "short"}, "token"),
        ({"name": "a", "token": "has spaces in it"}, "token"),
        ({"name": "a", "modle": "typo"}, "modle"),
        ({"name": "a", "model": ""}, "model"),
        ({"name": "a", "args": "--max-new-tokens 5"}, "args"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(data: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_spec(data)
    assert info.value.param == param
    assert info.value.message.startswith(param + ":")


def test_unknown_fields_say_so() -> None:
    with pytest.raises(InvalidRequest, match="unknown field"):
        parse_spec({"name": "a", "replica": 2})


def test_a_spec_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_spec(["name", "a"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-flag"], "unrecognized arguments"),
        (["--temperature", "3"], "out of range"),
        (["--max-new-tokens"], "expected one argument"),
        (["--port", "9000"], "--port is set by the console"),
        (["--model-path", "x"], "use model instead"),
        (["--engine", "fake"], "use engine instead"),
        (["--token", "abcdefgh"], "use token instead"),
        (["--service-name", "x"], "use name instead"),
        (["--cpu"], "resources.gpu"),
    ],
)
def test_extra_serve_flags_are_checked_by_the_serve_parser(args: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_spec({"name": "a", "args": args})
    assert info.value.param == "args"
    assert message in info.value.message


def test_valid_serve_flags_parse_to_their_values() -> None:
    spec = parse_spec({"name": "a", "args": ["--max-new-tokens", "64", "--ctx-size", "4096", "--api-only"]})
    options = spec.serve_options()
    assert (options.max_new_tokens, options.ctx_size, options.api_only) == (64, 4096, True)


def test_a_token_is_generated_when_absent_and_kept_when_given() -> None:
    first = parse_spec({"name": "a"}).with_token()
    second = parse_spec({"name": "a"}).with_token()
    assert first.token and len(first.token) >= 24 and first.token != second.token
    given = parse_spec({"name": "a", "token": "my-own-token"})
    assert given.with_token().token == "my-own-token"


def test_update_merges_changes_and_keeps_name_and_token() -> None:
    old = parse_spec({"name": "a", "engine": "fake", "resources": {"cpu": 2, "memory": 1024}}).with_token()
    new = merge_update(old, {"replicas": 2, "resources": {"memory": 2048}})
    assert new.replicas == 2 and new.resources.cpu == 2 and new.resources.memory == 2048
    assert new.name == "a" and new.token == old.token and new.engine == "fake"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"name": "b"}, "name"),
        ({"replicas": -1}, "replicas"),
        ({"args": ["--port", "1"]}, "args"),
        ({}, None),
    ],
)
def test_bad_updates_are_refused(changes: dict, param: str | None) -> None:
    old = parse_spec({"name": "a"}).with_token()
    with pytest.raises(InvalidRequest) as info:
        merge_update(old, changes)
    assert info.value.param == param
