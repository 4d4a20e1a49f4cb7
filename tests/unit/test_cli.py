import pytest

from easllm.cli import build_parser, configs_from
from easllm.config import EngineConfig, ServerConfig


def parse(*argv: str):
    return configs_from(build_parser().parse_args(["serve", *argv]))


def test_defaults_match_the_spec() -> None:
    server, engine = parse()
    assert (server.host, server.port, server.max_round) == ("127.0.0.1", 8000, 5)
    assert server.sampling.max_new_tokens == 2048 and server.sampling.temperature == 0.95
    assert server.sampling.top_k is None and server.sampling.top_p is None
    assert server.export_interval == 3600 and engine.model_path == "qwen2.5-0.5b-instruct"


def test_no_flags_give_the_config_dataclasses_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EASLLM_TOKEN", raising=False)
    monkeypatch.delenv("EASLLM_KB_DATABASE_URL", raising=False)
    assert parse() == (ServerConfig(), EngineConfig())  # a default is written once, in config.py


@pytest.mark.parametrize("flag", ["--max_round", "--max-round"])
def test_both_spellings_of_max_round(flag: str) -> None:
    assert parse(flag, "3")[0].max_round == 3


def test_every_spec_flag_parses() -> None:
    server, engine = parse(
        "--model-path",
        "gemma3-270m",
        "--engine",
        "llamacpp",
        "--cpu",
        "--precision",
        "bf16",
        "--port",
        "9000",
        "--host",
        "0.0.0.0",
        "--api-only",
        "--max-new-tokens",
        "64",
        "--temperature",
        "0",
        "--top_k",
        "5",
        "--top_p",
        "0.9",
        "--no-template",
        "--log-level",
        "debug",
        "--export-history-path",
        "/tmp/h",
        "--export-interval",
        "60",
        "--token",
        "secret",
    )
    assert engine.engine == "llamacpp" and engine.cpu and engine.precision == "bf16"
    assert server.api_only and server.no_template and server.log_level == "DEBUG" and server.token == "secret"
    assert server.sampling.top_k == 5 and server.sampling.top_p == 0.9 and server.sampling.temperature == 0
    assert str(server.export_history_path) == "/tmp/h" and server.export_interval == 60


def test_knowledge_database_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert configs_from(build_parser().parse_args(["serve"]))[0].knowledge.database_url is None
    url = "postgresql+psycopg://kb@db.internal/kb"
    monkeypatch.setenv("EASLLM_KB_DATABASE_URL", url)
    assert configs_from(build_parser().parse_args(["serve"]))[0].knowledge.database_url == url
    args = build_parser().parse_args(["serve", "--kb-database-url", "sqlite:////srv/kb.db"])
    assert configs_from(args)[0].knowledge.database_url == "sqlite:////srv/kb.db"


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_TOKEN", "from-env")
    assert configs_from(build_parser().parse_args(["serve"]))[0].token == "from-env"


@pytest.mark.parametrize(
    "argv",
    [
        ["--temperature", "3"],
        ["--top_p", "0"],
        ["--max-new-tokens", "0"],
        ["--port", "70000"],
        ["--api-only", "--no-api"],
        ["--engine", "magic"],
        ["--export-interval", "0"],
        ["--log-level", "LOUD"],
        ["--kb-database-url", "mysql://u@h/db"],
        ["--kb-database-url", "postgresql://h/" + "x" * 3000],
    ],
)
def test_bad_flags_exit_with_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
