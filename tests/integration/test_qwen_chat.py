"""The default bundled chat model (Qwen2.5 0.5B GGUF) answers through its ChatML template."""

import pytest
import requests

from tests.servers import running_server

pytestmark = pytest.mark.integration


def test_default_model_chats_with_history_and_system_prompt(tmp_path) -> None:
    with running_server(["--max-new-tokens", "48", "--threads", "2"], tmp_path) as server:
        health = server.health()
        assert (
            health["engine"]["model"] == "qwen2.5-0.5b-instruct" and health["engine"]["engine"] == "llamacpp"
        )
        body = {
            "prompt": "What is the capital of France? Answer with one word.",
            "system_prompt": "You are a helpful assistant.",
            "history": [["Hello", "Hello! How can I help you?"]],
            "temperature": 0,
        }
        r = requests.post(server.url, json=body, headers=server.headers(), timeout=120)
        data = r.json()
        assert r.status_code == 200, data
        assert "paris" in data["response"].lower()
        assert data["finish_reason"] == "stop"  # the model ends its turn with <|im_end|>
        assert "<|im_end|>" not in data["response"]
        assert data["history"][-1] == [body["prompt"], data["response"]]
