"""Resource recommendation: memory from size, precision and context; refusals this machine cannot hold."""

import json
import struct
from pathlib import Path

import pytest

from easllm.control.gguf_header import GgufError, read_gguf_header
from easllm.control.machine import GIB, Gpu, Machine, detect_machine
from easllm.control.modelfacts import BUNDLED_FACTS, model_facts
from easllm.control.recommend import MIB, RUNTIME_BYTES, recommend
from easllm.control.spec import parse_spec

BIG = Machine(cpus=64, memory_total_bytes=512 * GIB, memory_available_bytes=500 * GIB)
SMALL = Machine(cpus=2, memory_total_bytes=8 * GIB, memory_available_bytes=6 * GIB)
WITH_GPU = Machine(16, 128 * GIB, 120 * GIB, [Gpu("NVIDIA H100", 80 * GIB)])


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, layers: int = 4, kv_heads: int = 2, key_length: int = 64, ctx: int = 2048) -> Path:
    """A GGUF header with architecture keys, a tokenizer string array, and padding for weights."""
    kvs = [
        (_gguf_string("general.architecture"), struct.pack("<I", 8) + _gguf_string("llama")),
        (_gguf_string("general.parameter_count"), struct.pack("<IQ", 10, 1_500_000_000)),
        (_gguf_string("llama.context_length"), struct.pack("<II", 4, ctx)),
        (_gguf_string("llama.embedding_length"), struct.pack("<II", 4, 512)),
        (_gguf_string("llama.block_count"), struct.pack("<II", 4, layers)),
        (_gguf_string("llama.attention.head_count"), struct.pack("<II", 4, 8)),
        (_gguf_string("llama.attention.head_count_kv"), struct.pack("<II", 4, kv_heads)),
        (_gguf_string("llama.attention.key_length"), struct.pack("<II", 4, key_length)),
        (
            _gguf_string("tokenizer.ggml.tokens"),
            struct.pack("<IIQ", 9, 8, 3) + b"".join(_gguf_string(t) for t in ("a", "b", "c")),
        ),
    ]
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)))
        for key, value in kvs:
            f.write(key + value)
        f.write(b"\0" * 100_000)
    return path


def test_gguf_header_reader_finds_the_architecture(tmp_path: Path) -> None:
    header = read_gguf_header(write_gguf(tmp_path / "m.gguf"))
    assert header["general.architecture"] == "llama" and header["general.parameter_count"] == 1_500_000_000
    assert (header["block_count"], header["attention.head_count_kv"], header["context_length"]) == (
        4,
        2,
        2048,
    )


def test_gguf_header_reader_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 40)
    with pytest.raises(GgufError):
        read_gguf_header(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + b"\x05")
    with pytest.raises(GgufError, match="truncated"):
        read_gguf_header(tmp_path / "t.gguf")


def test_custom_gguf_memory_is_file_size_plus_exact_kv_cache(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "custom.gguf", layers=4, kv_heads=2, key_length=64, ctx=2048)
    spec = parse_spec({"name": "a", "model": str(path), "args": ["--ctx-size", "8192"]})
    rec = recommend(spec, BIG, tmp_path)
    assert rec.engine == "llamacpp" and rec.params_b == 1.5
    assert rec.context_tokens == 2048, "the context is capped at the model's"
    assert rec.weights_bytes == path.stat().st_size
    assert rec.kv_cache_bytes == 2 * 4 * 2 * 64 * 2 * 2048
    assert rec.per_replica_bytes == rec.weights_bytes + rec.kv_cache_bytes + rec.runtime_bytes
    assert rec.fits and rec.recommended["cpu"] == 4


def test_bundled_gemma_is_described_without_loading_it(tmp_path: Path) -> None:
    facts = model_facts("gemma3-270m", tmp_path)
    assert facts is not None and facts.format == "gguf" and facts.source == "bundled"
    params_b, ctx, kv, size = BUNDLED_FACTS["gemma3-270m"]
    rec = recommend(parse_spec({"name": "a", "model": "gemma-3-270m"}), BIG, tmp_path)
    assert rec.weights_bytes == size and rec.kv_cache_bytes == kv * 8192 and rec.params_b == params_b
    assert facts.context_length == ctx == 32768 and rec.context_tokens == 8192, "serve's default --ctx-size"
    assert rec.recommended["memory"] * MIB >= rec.per_replica_bytes


def test_catalog_model_size_follows_precision(tmp_path: Path) -> None:
    hf = {"name": "a", "model": "qwen1.5-7b", "engine": "transformers"}
    bf16 = recommend(parse_spec(hf), BIG, tmp_path)
    fp32 = recommend(parse_spec({**hf, "precision": "fp32"}), BIG, tmp_path)
    assert bf16.engine == "transformers" and bf16.weights_bytes == int(7.7e9 * 2)
    assert fp32.weights_bytes == 2 * bf16.weights_bytes
    assert bf16.recommended["cpu"] == 8 and bf16.recommended["memory"] * MIB > bf16.per_replica_bytes


def test_absent_catalog_weights_offline_are_refused_with_what_to_pull(tmp_path: Path) -> None:
    rec = recommend(parse_spec({"name": "a", "model": "qwen1.5-7b"}), BIG, tmp_path)
    assert not rec.fits and rec.engine == "llamacpp" and rec.precision == "q4_k_m"
    assert rec.weights_bytes == int(7.7e9 * 0.6), "estimated from the catalog while the hub is unreachable"
    message = rec.problems[0].message
    assert rec.problems[0].param == "model" and "not on this machine" in message
    assert "easllm pull Qwen/Qwen1.5-7B-Chat-GGUF" in message and "HF_HUB_OFFLINE" in message


def test_catalog_weights_in_the_models_folder_are_found(tmp_path: Path) -> None:
    local = tmp_path / "models" / "gemma-2b-it"
    local.mkdir(parents=True)
    config = {"num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256}
    (local / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    facts = model_facts("gemma-2b-it", tmp_path)
    assert facts is not None and facts.available and facts.kv_bytes_per_token == 2 * 18 * 1 * 256 * 2


def test_model_too_big_for_this_machine_is_refused_with_numbers(tmp_path: Path) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    assert recommend(parse_spec({"name": "a", "model": str(gguf), "replicas": 8}), SMALL, tmp_path).fits
    rec = recommend(parse_spec({"name": "a", "model": str(gguf), "replicas": 16}), SMALL, tmp_path)
    assert [p.message for p in rec.problems] == [
        "16 replica(s) need 8.1 GiB of memory; this machine has 6.0 GiB available (8.0 GiB total)"
    ]
    rec = recommend(parse_spec({"name": "a", "model": "qwen1.5-14b"}), SMALL, tmp_path)
    memory = [p for p in rec.problems if "GiB of memory" in p.message]
    assert memory and "6.0 GiB available" in memory[0].message


@pytest.mark.parametrize(
    ("resources", "param", "text"),
    [
        ({"cpu": 4}, "resources.cpu", "this machine has 2"),
        ({"memory": 100}, "resources.memory", "less than"),
        ({"memory": 7000, "cpu": 1}, "resources.memory", "GiB of memory"),
        ({"gpu": 1}, "resources.gpu", "has 0"),
    ],
)
def test_resources_beyond_the_machine_are_refused(
    tmp_path: Path, resources: dict, param: str, text: str
) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    rec = recommend(parse_spec({"name": "a", "model": str(gguf), "resources": resources}), SMALL, tmp_path)
    assert any(p.param == param and text in p.message for p in rec.problems), rec.problems


def test_vllm_without_a_gpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    rec = recommend(parse_spec({"name": "a", "model": "qwen1.5-7b", "engine": "vllm"}), BIG, tmp_path)
    assert any(p.param == "engine" and "GPU" in p.message for p in rec.problems)


def test_gpu_recommendation_picks_a_gpu_size(tmp_path: Path) -> None:
    rec = recommend(
        parse_spec({"name": "a", "model": "qwen1.5-14b", "resources": {"gpu": 1}}), WITH_GPU, tmp_path
    )
    assert rec.device == "gpu" and rec.recommended["gpu"] == 1 and rec.recommended["gpu_memory"] == 40 * 1024


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ({"engine": "transformers"}, "needs a Hugging Face directory"),
        ({"precision": "fp16"}, "own quantisation"),
    ],
)
def test_engine_and_precision_must_fit_the_model_format(tmp_path: Path, spec: dict, text: str) -> None:
    gguf = write_gguf(tmp_path / "m.gguf")
    rec = recommend(parse_spec({"name": "a", "model": str(gguf), **spec}), BIG, tmp_path)
    assert any(text in p.message for p in rec.problems), rec.problems


def test_unknown_models_are_refused(tmp_path: Path) -> None:
    rec = recommend(parse_spec({"name": "a", "model": "no-such-model"}), BIG, tmp_path)
    assert [p.param for p in rec.problems] == ["model"] and "unknown model" in rec.problems[0].message


def test_the_fake_engine_needs_no_model(tmp_path: Path) -> None:
    rec = recommend(parse_spec({"name": "a", "model": "anything", "engine": "fake"}), SMALL, tmp_path)
    assert rec.fits and rec.weights_bytes == 0 and rec.per_replica_bytes == RUNTIME_BYTES["fake"]


def test_summary_tells_memory_and_refusals(tmp_path: Path) -> None:
    text = recommend(parse_spec({"name": "a", "model": "qwen1.5-7b"}), BIG, tmp_path).summary()
    assert "memory per replica" in text and "recommended per replica: 8 CPU cores" in text
    assert "cannot deploy: model:" in text


def test_this_machine_is_detected() -> None:
    machine = detect_machine()
    assert machine.cpus >= 1 and 0 < machine.memory_available_bytes <= machine.memory_total_bytes


def test_a_model_to_pull_is_sized_from_its_listing_and_refused_when_the_disk_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easllm.control import modelfacts
    from easllm.models import plan as plan_module
    from easllm.models.plan import RemoteFile, RemotePlan

    gguf = RemoteFile("qwen2-7b-instruct-q4_k_m.gguf", 4_683_073_952, "ab" * 32)
    listing = RemotePlan("huggingface", "Qwen/Qwen2-7B-Instruct-GGUF", None, "gguf", [gguf])
    monkeypatch.setattr(modelfacts, "plan", lambda ref: listing)  # what the hub's listing says
    rec = recommend(parse_spec({"name": "a", "model": "qwen2-7b"}), BIG, tmp_path)
    assert rec.fits and rec.engine == "llamacpp" and rec.weights_bytes == gguf.size
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 2 << 30})())
    rec = recommend(parse_spec({"name": "a", "model": "qwen2-7b"}), BIG, tmp_path)
    assert [p.param for p in rec.problems] == ["model"] and "not enough disk" in rec.problems[0].message
