"""`easllm kb` on a data directory: add, list, query, remove, and refusals with exit code 2."""

import argparse
from pathlib import Path

import pytest

from easllm.rag.cli import add_kb_commands, run_kb
from tests.rag_samples import DEEPSPEED_README, FACTS_JA


def kb(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_kb_commands(parser.add_subparsers(dest="command"))
    return run_kb(parser.parse_args(["kb", *argv]))


def test_add_list_query_remove_on_a_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "svc")]
    readme = tmp_path / "README.md"
    readme.write_text(DEEPSPEED_README)
    notes = tmp_path / "忘年会.txt"
    notes.write_text(FACTS_JA)
    assert kb("add", str(readme), str(notes), *data) == 0
    out = capsys.readouterr().out
    assert "README.md\tmd\t" in out and "忘年会.txt\ttxt\t" in out

    assert kb("list", *data) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == [
        "README.md",
        "忘年会.txt",
    ]

    assert kb("query", "忘年会の会費", "--top-k", "1", *data) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "忘年会.txt" in out and "五千円" in out

    assert kb("remove", "README.md", *data) == 0
    assert kb("list", *data) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("忘年会.txt")
    assert (tmp_path / "svc" / "knowledge" / "knowledge.db").exists()


def test_refusals_exit_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    bad = tmp_path / "slides.pptx"
    bad.write_bytes(b"PK")
    assert kb("add", str(bad), *data) == 2
    assert "unsupported file type .pptx" in capsys.readouterr().err
    assert kb("add", str(tmp_path / "missing.txt"), *data) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert kb("remove", "nothing.txt", *data) == 2
    assert "no file named 'nothing.txt'" in capsys.readouterr().err


def test_an_unreachable_service_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert kb("list", "--url", "http://127.0.0.1:9") == 2
    assert "cannot reach http://127.0.0.1:9/v1/knowledge" in capsys.readouterr().err


def test_a_database_url_names_the_knowledge_base_a_service_would_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from easllm.rag.sql_schema import sqlite_url
    from easllm.rag.sql_store import SqlStore

    url = sqlite_url(tmp_path / "shared.db")
    notes = tmp_path / "忘年会.txt"
    notes.write_text(FACTS_JA)
    where = ["--kb-database-url", url, "--service-name", "party", "--data-dir", str(tmp_path / "d")]
    assert kb("add", str(notes), *where) == 0
    assert [f.name for f in SqlStore(url, "party").files()] == ["忘年会.txt"]  # what the service reads
    assert SqlStore(url, "other").files() == []
    assert not (tmp_path / "d" / "knowledge" / "knowledge.db").exists()
    with pytest.raises(SystemExit):  # argparse refuses it with the reason
        kb("list", "--kb-database-url", "mysql://u@h/db")
    assert "supports sqlite and postgresql databases, not mysql" in capsys.readouterr().err
