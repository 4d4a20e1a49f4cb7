"""The knowledge-base store tests again on PostgreSQL, and two `easllm serve` processes with their
own data directories (two machines, as far as they can tell) sharing one knowledge base there.

The throwaway PostgreSQL server is test_console_postgres.py's fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.integration.test_console_postgres import fresh_database, postgres_server  # noqa: F401
from tests.servers import running_server
from tests.unit.test_rag_sql_store import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_process_killed_mid_transaction_leaves_the_last_committed_state,
    test_a_write_through_one_replica_is_seen_by_the_other_at_once,
    test_an_error_inside_the_transaction_leaves_the_last_commit,
    test_an_old_faiss_folder_moves_into_the_database_once,
    test_catching_up_fetches_only_the_new_rows,
    test_concurrent_puts_of_different_files_through_two_replicas_all_survive,
    test_removing_the_last_file_empties_the_base_and_frees_the_embedder,
    test_replicas_starting_at_once_on_a_fresh_database_make_one_schema_and_one_base,
    test_same_name_replaces_and_remove_then_reopen_keeps_the_rest,
    test_search_ranks_by_cosine_and_keeps_pages,
    test_the_keyword_index_is_fed_from_the_rows_like_faiss,
    test_two_services_in_one_database_are_separate,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def kb_url(fresh_database: str) -> str:  # noqa: F811
    """The imported store tests use this one: PostgreSQL instead of SQLite."""
    return fresh_database


@pytest.mark.slow  # 25 s; the store tests above run on PostgreSQL in `make test`
def test_two_servers_on_other_data_dirs_share_the_knowledge_base_in_postgresql(
    fresh_database: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    def serve(node: str):  # type: ignore[no-untyped-def]
        data = tmp_path / node
        data.mkdir()
        args = ["--engine", "fake", "--api-only", "--service-name", "svc", "--data-dir", str(data)]
        return running_server([*args, "--kb-database-url", fresh_database], data)

    with serve("node1") as one, serve("node2") as two:
        files = [("files", ("harbour.txt", b"The harbour master is Agnieszka and she starts at six."))]
        r = requests.post(f"{one.url}/v1/knowledge/files", files=files, headers=one.headers(), timeout=120)
        assert r.status_code == 200, r.text + one.log()
        query = {"query": "Who is the harbour master?", "top_k": 1}
        r = requests.post(f"{two.url}/v1/knowledge/query", json=query, headers=two.headers(), timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["source"] == "harbour.txt", r.text
        r = requests.delete(f"{two.url}/v1/knowledge/files/harbour.txt", headers=two.headers(), timeout=60)
        assert r.status_code == 200, r.text
        r = requests.get(f"{one.url}/v1/knowledge/files", headers=one.headers(), timeout=60)
        assert r.json()["files"] == [] and r.json()["chunks"] == 0
    for node in ("node1", "node2"):
        assert not (tmp_path / node / "knowledge" / "knowledge.db").exists(), "no SQLite file with a URL"
