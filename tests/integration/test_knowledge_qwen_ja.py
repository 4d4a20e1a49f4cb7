"""A Japanese question answered by the bundled Qwen from the source page (EAS LLM deployment, Japanese)
uploaded beside an English README: hybrid retrieval finds the excerpt and the answer holds the fact."""

from pathlib import Path

import pytest
import requests

from tests.rag_samples import DEEPSPEED_README
from tests.servers import running_server

pytestmark = pytest.mark.integration

SOURCE_PAGE = Path(__file__).resolve().parents[2] / "bench" / "data" / "eas-llm-deploy.ja.txt"


def test_how_long_a_deployment_takes_is_answered_from_the_japanese_page(tmp_path: Path) -> None:
    args = [
        "--max-new-tokens",
        "64",
        "--threads",
        "2",
        "--temperature",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
    ]
    with running_server(args, tmp_path) as server:
        files = [
            ("files", ("eas-llm-deploy.ja.txt", SOURCE_PAGE.read_bytes())),
            ("files", ("deepspeed-README.md", DEEPSPEED_README.encode())),
        ]
        r = requests.post(
            f"{server.url}/v1/knowledge/files", files=files, headers=server.headers(), timeout=600
        )
        assert r.status_code == 200, r.text

        body = {
            "prompt": "EASでモデルのデプロイにはどのくらい時間がかかりますか？",
            "langchain": True,
            "temperature": 0,
        }
        data = requests.post(server.url, json=body, headers=server.headers(), timeout=300).json()
        assert data["sources"][0]["source"] == "eas-llm-deploy.ja.txt", data["sources"]
        assert "約5分" in data["sources"][0]["content"]
        assert "5分" in data["response"].replace(" ", ""), data["response"]
