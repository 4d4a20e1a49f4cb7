"""The console deploys a catalog name whose files come from a (fake) Hugging Face Hub: it pulls the
model once for the machine, shows the progress, then starts the replicas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub, running_hub
from tests.integration.test_console import call, running_console

pytestmark = pytest.mark.integration
GEMMA = Path(os.environ["EASLLM_HOME"]) / "models" / "gemma-3-270m-q4_k_m.gguf"
REPO = "Qwen/Qwen1.5-1.8B-Chat-GGUF"
FILE = "qwen1_5-1_8b-chat-q4_k_m.gguf"  # the catalog's Q4_K_M file of qwen1.5-1.8b
SERVE = ["--serve-args", "--api-only --threads 2 --max-new-tokens 8 --ctx-size 2048"]


@pytest.mark.skipif(not GEMMA.is_file(), reason="the bundled gemma GGUF is not assembled")
def test_deploy_a_catalog_name_pulls_once_with_progress(tmp_path: Path) -> None:
    hub = FakeHub(seconds_per_chunk=0.01)  # ~2.5 s for the file: progress has time to show
    hub.add(REPO, FILE, GEMMA)  # a real, small GGUF under the catalog's file name
    hub.add("Qwen/Qwen2-7B-Instruct-GGUF", "qwen2-7b-instruct-q4_k_m.gguf", b"GGUF" + bytes(64))
    hub.gated["Qwen/Qwen2-7B-Instruct-GGUF"] = "hf_not_given"
    with running_hub(hub):
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        with running_console(tmp_path / "state", env=env) as console:
            dry = console.cli("deploy", "--name", "pulled", "--model", "qwen1.5-1.8b", "--dry-run", *SERVE)
            assert dry.returncode == 0 and "weights 0.24 GiB" in dry.stdout, dry.stdout + dry.stderr
            assert hub.downloads(FILE) == 0, "the recommendation reads the hub's listing, downloads nothing"
            gated = console.cli("deploy", "--name", "gated", "--model", "qwen2-7b", *SERVE)
            assert gated.returncode == 2 and "is gated" in gated.stderr and "HF_TOKEN" in gated.stderr

            out = console.cli("deploy", "--name", "pulled", "--model", "qwen1.5-1.8b", *SERVE)
            assert out.returncode == 0, out.stdout + out.stderr + console.log()
            assert "pulled: pulling Qwen/Qwen1.5-1.8B-Chat-GGUF from huggingface" in out.stdout
            service = console.describe("pulled")
            assert service["pull"]["state"] == "done" and service["pull"]["percent"] == 100
            assert service["pull"]["total_bytes"] == GEMMA.stat().st_size
            pulls = [e["message"] for e in service["events"] if e["kind"] == "pull"]
            assert pulls[0].startswith(f"fetching {REPO}") and pulls[-1].startswith(f"pulled {REPO}")
            assert any("%" in m for m in pulls[1:-1]), pulls
            endpoint, token = service["invocation"]["endpoint"], service["token"]
            assert call(endpoint, token, "The capital of France is", max_new_tokens=4).status_code == 200

            again = console.cli("deploy", "--name", "second", "--model", "qwen1.5-1.8b", *SERVE)
            assert again.returncode == 0, again.stdout + again.stderr
            assert hub.downloads(FILE) == 1, "one pull per machine"
            described = console.cli("describe", "pulled")
            assert "Model pull" in described.stdout and "100%" in described.stdout
