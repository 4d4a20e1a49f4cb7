"""Which files a pull fetches and which errors it gives, without a network."""

from __future__ import annotations

from pathlib import Path

import pytest

from easllm.cli import build_parser
from easllm.errors import ModelNotFound, PullFailed
from easllm.models import plan as plan_module
from easllm.models.catalog import CATALOG
from easllm.models.plan import check_disk, choose_gguf, choose_hf, quantizations
from easllm.models.pull import remote_ref
from easllm.models.s3 import parse_s3_url

SPLIT = ["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf", "big-Q4_K_M.gguf"]


def test_every_catalog_model_names_its_sources() -> None:
    assert len(CATALOG) == 16
    for entry in CATALOG.values():
        assert "/" in entry.repo_id and "/" in entry.ms_repo_id
        if entry.gguf_repo:
            assert "Q4_K_M" in entry.gguf_files and all(
                f.endswith(".gguf") for f in entry.gguf_files.values()
            )


def test_a_catalog_name_is_its_gguf_build_on_a_cpu_and_safetensors_elsewhere() -> None:
    cpu = remote_ref("qwen2-7b")
    assert cpu is not None and (cpu.repo_id, cpu.format, cpu.quant) == (
        "Qwen/Qwen2-7B-Instruct-GGUF",
        "gguf",
        "Q4_K_M",
    )
    assert cpu.known_files["Q4_K_M"] == "qwen2-7b-instruct-q4_k_m.gguf"
    assert remote_ref("qwen2-7b", quantization="q8_0").quant == "Q8_0"  # type: ignore[union-attr]
    for hf in (remote_ref("qwen2-7b", engine="transformers"), remote_ref("qwen2-7b", gpu=True)):
        assert hf is not None and (hf.repo_id, hf.format) == ("Qwen/Qwen2-7B-Instruct", "hf")
    ms = remote_ref("llama3-8b", engine="vllm", source="modelscope")
    assert ms is not None and ms.repo_id == "LLM-Research/Meta-Llama-3-8B-Instruct"
    no_gguf = remote_ref("chatglm3-6b")
    assert no_gguf is not None and no_gguf.format == "hf"
    with pytest.raises(ModelNotFound, match=r"no GGUF build of chatglm3-6b.*--engine transformers"):
        remote_ref("chatglm3-6b", engine="llamacpp")


def test_repositories_urls_and_what_is_not_remote() -> None:
    ref = remote_ref("Qwen/Qwen2.5-1.5B-Instruct-GGUF:q4_k_m")
    assert ref is not None and (ref.repo_id, ref.quant, ref.format) == (
        "Qwen/Qwen2.5-1.5B-Instruct-GGUF",
        "Q4_K_M",
        "gguf",
    )
    assert remote_ref("Qwen/Qwen2.5-1.5B-Instruct", engine="transformers").format == "hf"  # type: ignore[union-attr]
    assert remote_ref("Qwen/Qwen2.5-1.5B-Instruct").format is None  # type: ignore[union-attr]
    assert remote_ref("s3://bucket/models/llama3-8b/").source == "s3"  # type: ignore[union-attr]
    assert remote_ref("no-such-model") is None and remote_ref("a/b/c") is None
    with pytest.raises(ModelNotFound, match="--quantization"):
        remote_ref("qwen2-7b", quantization="Q4 K M")
    with pytest.raises(ModelNotFound, match="--model-source"):
        remote_ref("qwen2-7b", source="ftp")
    assert parse_s3_url("s3://b/models/x") == ("b", "models/x/")
    with pytest.raises(ModelNotFound):
        parse_s3_url("s3:///nobucket")


def test_gguf_choice_by_quantization_with_split_files_and_listings() -> None:
    assert choose_gguf("r", SPLIT, "Q8_0", {}) == SPLIT[:2]
    assert choose_gguf("r", SPLIT, "q4_k_m", {}) == ["big-Q4_K_M.gguf"]
    assert choose_gguf("r", ["only.gguf", "README.md"], None, {}) == ["only.gguf"]
    assert quantizations(SPLIT) == ["Q4_K_M", "Q8_0"]
    with pytest.raises(ModelNotFound, match=r"several GGUF files.*\(Q4_K_M, Q8_0\)"):
        choose_gguf("r", SPLIT, None, {})
    with pytest.raises(ModelNotFound, match="no Q4_K GGUF file"):
        choose_gguf("r", SPLIT, "Q4_K", {})  # Q4_K is not Q4_K_M
    with pytest.raises(ModelNotFound, match=r"no \.gguf file"):
        choose_gguf("r", ["config.json"], None, {})
    assert choose_gguf("r", ["x.gguf", "y.gguf"], "Q4_K_M", {"Q4_K_M": "y.gguf"}) == ["y.gguf"]


def test_safetensors_choice_skips_other_weights() -> None:
    names = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "original/x.pth",
        "a.onnx",
    ]
    assert choose_hf("r", names) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert choose_hf("r", ["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(ModelNotFound, match="use --engine llamacpp"):
        choose_hf("r", ["m.gguf"])


def test_not_enough_disk_says_how_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 30})())
    check_disk(512 << 20, tmp_path / "not" / "yet", "pull x")
    with pytest.raises(PullFailed, match=r"needs 4\.00 GiB in .* 1\.00 GiB are free.*HF_HOME"):
        check_disk(4 << 30, tmp_path / "not" / "yet", "pull x")


def test_pull_flags_are_bounded() -> None:
    parser = build_parser()
    args = parser.parse_args(["pull", "qwen2-7b", "--quantization", "q5_k_m", "--model-source", "modelscope"])
    assert (args.quantization, args.model_source) == ("Q5_K_M", "modelscope")
    for bad in (["--quantization", "x" * 33], ["--quantization", "Q4 K"], ["--model-source", "ftp"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
