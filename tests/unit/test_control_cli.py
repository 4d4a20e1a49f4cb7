"""The console's CLI: flags become a spec, console flags parse, and errors become exit codes."""

import json
from pathlib import Path

import pytest

from easllm.cli import build_parser, main
from easllm.control.cli import _spec_from_flags
from easllm.control.config import load_or_create_admin_token


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(list(argv))


def test_deploy_flags_become_a_spec() -> None:
    args = parse(
        "deploy", "--name", "llm_demo001", "--model", "gemma3-270m", "--engine", "llamacpp",
        "--replicas", "2", "--cpus", "2", "--memory", "2048", "--gpus", "0", "--token", "my-token-1",
        "--serve-args", "--max-new-tokens 64 --temperature 0",
    )  # fmt: skip
    spec = _spec_from_flags(args)
    assert args.name == "llm_demo001" and not args.dry_run and not args.no_wait
    assert spec["model"] == "gemma3-270m" and spec["engine"] == "llamacpp" and spec["replicas"] == 2
    assert spec["resources"] == {"cpu": 2, "memory": 2048, "gpu": 0} and spec["token"] == "my-token-1"
    assert spec["args"] == ["--max-new-tokens", "64", "--temperature", "0"]


def test_update_sends_only_what_changes() -> None:
    args = parse("update", "llm_demo001", "--replicas", "3")
    assert args.name == "llm_demo001" and _spec_from_flags(args) == {"replicas": 3}


def test_console_flags() -> None:
    args = parse("console", "--port", "9090", "--db", "postgresql+psycopg://u@h/db", "--keep-replicas")
    assert (args.port, args.db, args.keep_replicas, args.host) == (
        9090,
        "postgresql+psycopg://u@h/db",
        True,
        "127.0.0.1",
    )
    assert parse("console").port == 8080


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "--engine", "magic"],
        ["deploy", "--replicas", "two"],
        ["describe"],
        ["logs", "x", "--tail", "many"],
        ["console", "--port", "http"],
    ],
)
def test_bad_flags_exit_with_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2 and "error" in capsys.readouterr().err


def test_an_unreadable_spec_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    assert main(["deploy", str(bad), "--console", "http://127.0.0.1:9", "--admin-token", "x"]) == 2
    assert "cannot read the spec" in capsys.readouterr().err


def test_no_console_running_is_said_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--console", "http://127.0.0.1:9", "--admin-token", "x"]) == 1
    assert "is `easllm console` running?" in capsys.readouterr().err


def test_the_admin_token_file_is_created_once_and_private(tmp_path: Path) -> None:
    token = load_or_create_admin_token(tmp_path)
    path = tmp_path / "console-admin-token"
    assert len(token) >= 24 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_admin_token(tmp_path) == token
    assert json.dumps(token)  # printable


def test_routing_and_failed_start_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        "console", "--routing", "least-loaded", "--routing-load-factor", "2", "--max-failed-starts", "3"
    )
    assert (args.routing, args.routing_load_factor, args.max_failed_starts) == ("least-loaded", 2.0, 3)
    defaults = parse("console")
    assert (defaults.routing, defaults.routing_load_factor, defaults.max_failed_starts) == ("prefix", 1.25, 5)
    with pytest.raises(SystemExit):
        parse("console", "--routing", "random")
    for flag, value in (("--routing-load-factor", "0.5"), ("--routing-load-factor", "1000"),
                        ("--max-failed-starts", "0")):  # fmt: skip
        assert main(["console", flag, value]) == 2
        assert f"error ({flag})" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["", "a b", "../x", "r" * 65, "replica;rm"])
def test_a_replica_name_goes_into_file_names_so_it_is_checked(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse("serve", "--replica-name", name)
    assert info.value.code == 2 and "letters, digits, _ and -" in capsys.readouterr().err
    assert parse("serve", "--replica-name", "replica-12").replica_name == "replica-12"
