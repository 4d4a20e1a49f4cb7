"""The vLLM adapter against a fake `vllm` package (tests/fake_vllm) that records every call.

vLLM itself needs CUDA; these tests pin what we hand it (engine arguments, every sampling field,
the prompt, aborts) and what we make of what it streams back (cumulative -> deltas, finish
reasons, usage, log-probabilities), and that `--engine vllm` without vLLM stops at start.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from easllm.app import create_app
from easllm.cli import build_parser, configs_from
from easllm.config import EngineConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.vllm import VllmEngine, engine_args
from easllm.engine.base import EngineOverloaded
from easllm.engine.factory import EngineUnavailable, build_engine
from easllm.engine.types import FEATURES, FinishReason, GenerationRequest, SamplingParams, TokenDelta
from easllm.errors import InvalidRequest
from easllm.models.resolve import ResolvedModel
from easllm.serve import serve

FAKE_VLLM = Path(__file__).parent.parent / "fake_vllm"
GRAMMAR = 'root ::= "yes" | "no"'


def _forget_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The fake package importable as `vllm`; its AsyncLLM class (instances, script) is yielded."""
    _forget_vllm()
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    async_llm = importlib.import_module("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM.instances = []
    yield async_llm.AsyncLLM
    _forget_vllm()


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    _forget_vllm()
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, find_spec says absent


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    return tmp_path


async def started(model_dir: Path, **config: object) -> VllmEngine:
    engine = VllmEngine(model_dir, EngineConfig(engine="vllm", **config), "tiny-hf")  # type: ignore[arg-type]
    await engine.start()
    return engine


async def collect(engine: VllmEngine, req: GenerationRequest) -> list[TokenDelta]:
    return [d async for d in engine.generate(req)]


# -- engine arguments ----------------------------------------------------------------------------


async def test_start_passes_model_tensor_parallel_context_and_dtype(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir, tensor_parallel_size=4, ctx_size=16384, precision="bf16")
    (llm,) = fake_vllm.instances
    assert llm.args.kwargs == {
        "model": str(model_dir),
        "tensor_parallel_size": 4,
        "max_model_len": 4096,  # capped at the model's own limit
        "dtype": "bfloat16",
        "max_num_seqs": 16,
        "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": True,
        "disable_log_stats": True,
    }
    info = engine.model_info
    assert (info.engine, info.name, info.context_length) == ("vllm", "tiny-hf", 4096)
    assert info.chat_template == llm.tokenizer.chat_template  # the tokenizer's own template
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    assert info.features == FEATURES
    assert engine.health().ready and engine.health().details["tensor_parallel_size"] == 4
    await engine.close()
    assert llm.shut_down


def test_engine_args_default_dtype_and_context_without_a_model_limit(tmp_path: Path) -> None:
    args = engine_args(tmp_path, EngineConfig(ctx_size=2048))
    assert (args["dtype"], args["max_model_len"], args["tensor_parallel_size"]) == ("auto", 2048, 1)


def test_tensor_parallel_size_flag_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", "--engine", "vllm", "--tensor-parallel-size", "2"])
    _, engine = configs_from(args)
    assert engine.tensor_parallel_size == 2
    _, default = configs_from(build_parser().parse_args(["serve"]))
    assert default.tensor_parallel_size == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tensor-parallel-size", "0"])


def test_max_num_seqs_defaults_to_vllms_own_and_memory_share_reaches_vllm(tmp_path: Path) -> None:
    def engine_for(*flags: str) -> EngineConfig:
        return configs_from(build_parser().parse_args(["serve", *flags]))[1]

    assert engine_for("--engine", "vllm").max_batch == 256  # vLLM's default on GPUs
    assert engine_for().max_batch == engine_for("--engine", "llamacpp").max_batch == 16
    assert engine_for("--engine", "vllm", "--max-num-seqs", "16").max_batch == 16
    config = engine_for("--engine", "vllm", "--max-num-seqs", "48", "--gpu-memory-utilization", "0.45")
    args = engine_args(tmp_path, config)
    assert (args["max_num_seqs"], args["gpu_memory_utilization"]) == (48, 0.45)
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--gpu-memory-utilization", bad])


# -- sampling ------------------------------------------------------------------------------------


async def test_every_sampling_field_is_mapped(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    sampling = SamplingParams(
        max_new_tokens=7,
        temperature=0.3,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=1234,
        stop=("\n\n", "END"),
        grammar=GRAMMAR,
        logprobs=3,
    )
    await collect(engine, GenerationRequest([1, 2, 3], sampling, request_id="req-1"))
    (llm,) = fake_vllm.instances
    ((prompt, params, request_id),) = llm.generate_calls
    assert prompt == {"prompt_token_ids": [1, 2, 3]} and request_id == "req-1"
    grammar = params.kwargs.pop("structured_outputs")
    assert type(grammar).__name__ == "StructuredOutputsParams" and grammar.kwargs == {"grammar": GRAMMAR}
    assert params.kwargs == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 1234,
        "stop": ["\n\n", "END"],
        "logprobs": 3,
        "skip_special_tokens": True,
    }


async def test_defaults_map_to_vllm_none_values(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    await collect(engine, GenerationRequest([1], SamplingParams(top_k=0)))
    params = fake_vllm.instances[0].generate_calls[0][1]
    assert params.kwargs["top_k"] == -1  # no top-k: -1, which every vLLM release accepts
    assert params.kwargs["seed"] is None and params.kwargs["logprobs"] is None
    assert params.kwargs["stop"] == [] and "structured_outputs" not in params.kwargs


async def test_grammar_uses_guided_decoding_on_older_vllm(
    fake_vllm, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(sys.modules["vllm.sampling_params"], "StructuredOutputsParams")
    engine = await started(model_dir)
    await collect(engine, GenerationRequest([1], SamplingParams(grammar=GRAMMAR)))
    params = fake_vllm.instances[0].generate_calls[0][1]
    assert "structured_outputs" not in params.kwargs
    assert type(params.kwargs["guided_decoding"]).__name__ == "GuidedDecodingParams"
    assert params.kwargs["guided_decoding"].kwargs == {"grammar": GRAMMAR}


async def test_parameters_vllm_refuses_are_a_bad_request(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    with pytest.raises(InvalidRequest, match="presence_penalty"):
        await collect(engine, GenerationRequest([1], SamplingParams(presence_penalty=3.0)))
    assert fake_vllm.instances[0].generate_calls == []


# -- streaming -----------------------------------------------------------------------------------


async def test_cumulative_outputs_become_deltas(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    deltas = await collect(engine, GenerationRequest([1, 2], SamplingParams(), request_id="r"))
    assert [d.text for d in deltas] == ["Hel", "lo", " wor", "ld"]
    assert [d.token_ids for d in deltas] == [[72], [108], [32], [100]]
    assert [d.finish_reason for d in deltas] == [None, None, None, FinishReason.STOP]
    assert all(d.usage is None for d in deltas[:-1])
    usage = deltas[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)
    assert all(d.request_id == "r" and d.logprobs is None for d in deltas)
    assert engine.health().finished_total == 1 and engine.health().running == 0


async def test_max_tokens_ends_with_length(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    deltas = await collect(engine, GenerationRequest([1], SamplingParams(max_new_tokens=2)))
    assert "".join(d.text for d in deltas) == "Hello"
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2


async def test_logprobs_per_token_with_the_top_n(fake_vllm, model_dir: Path) -> None:
    engine = await started(model_dir)
    deltas = await collect(engine, GenerationRequest([1], SamplingParams(logprobs=1)))
    entries = [lp for d in deltas for lp in d.logprobs or []]
    assert [e.token for e in entries] == ["Hel", "lo", " wor", "ld"]
    assert all(e.logprob == -0.25 for e in entries)
    assert entries[0].top == {"Hel": -0.25}  # rank 2 is outside top 1
    deltas = await collect(engine, GenerationRequest([1], SamplingParams(logprobs=2)))
    assert deltas[0].logprobs is not None and deltas[0].logprobs[0].top == {"Hel": -0.25, "HEL!": -2.0}


async def test_closing_the_stream_aborts_the_request(fake_vllm, model_dir: Path) -> None:
    fake_vllm.hang_after = 1
    try:
        engine = await started(model_dir)
        req = GenerationRequest([1], SamplingParams(), request_id="gone")
        async with aclosing(engine.generate(req)) as stream:
            first = await anext(stream)
            assert first.text == "Hel" and first.finish_reason is None
        llm = fake_vllm.instances[0]
        assert llm.aborted == ["gone"] and llm.closed_streams == ["gone"]
        assert engine.health().aborted_total == 1 and engine.health().running == 0
    finally:
        fake_vllm.hang_after = None


async def test_abort_by_id_ends_the_stream_with_abort(fake_vllm, model_dir: Path) -> None:
    fake_vllm.hang_after = 2
    try:
        engine = await started(model_dir)
        req = GenerationRequest([1], SamplingParams(), request_id="stop-me")
        stream = engine.generate(req)
        assert (await anext(stream)).text == "Hel"
        assert (await anext(stream)).text == "lo"
        await engine.abort("stop-me")
        last = await anext(stream)
        assert last.finish_reason is FinishReason.ABORT and last.text == ""
        assert fake_vllm.instances[0].aborted == ["stop-me"]
    finally:
        fake_vllm.hang_after = None


async def test_too_many_requests_in_flight_is_overload(fake_vllm, model_dir: Path) -> None:
    fake_vllm.hang_after = 0
    try:
        engine = await started(model_dir, max_queue=1)  # the fake's max_num_seqs is 2: room for 3
        streams = [engine.generate(GenerationRequest([1], request_id=f"r{i}")) for i in range(4)]
        waiting = [asyncio.ensure_future(anext(s)) for s in streams[:3]]
        deadline = time.monotonic() + 5
        while len(fake_vllm.instances[0].generate_calls) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded):
            await anext(streams[3])
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert sorted(fake_vllm.instances[0].aborted) == ["r0", "r1", "r2"]
        assert engine.health().running == 0
    finally:
        fake_vllm.hang_after = None


# -- choosing the engine -------------------------------------------------------------------------


def test_without_vllm_the_engine_is_refused_with_the_install_line(no_vllm, model_dir: Path) -> None:
    model = ResolvedModel("tiny-hf", model_dir, "hf")
    with pytest.raises(EngineUnavailable, match=r"pip install 'easllm\[vllm\]'"):
        build_engine(EngineConfig(engine="vllm"), model)


def test_serve_stops_at_start_without_vllm(no_vllm, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code = serve(ServerConfig(port=1), EngineConfig(engine="vllm", model_path=str(model_dir)))
    assert code == 2
    assert "pip install 'easllm[vllm]'" in capsys.readouterr().err


def test_gguf_models_are_refused(fake_vllm, tmp_path: Path) -> None:
    model = ResolvedModel("m", tmp_path / "m.gguf", "gguf")
    with pytest.raises(EngineUnavailable, match="Hugging Face model directory"):
        build_engine(EngineConfig(engine="vllm"), model)


def test_factory_builds_the_adapter_when_vllm_is_there(fake_vllm, model_dir: Path) -> None:
    engine = build_engine(EngineConfig(engine="vllm"), ResolvedModel("tiny-hf", model_dir, "hf"))
    assert isinstance(engine, VllmEngine) and engine.model_dir == model_dir


# -- through the app -----------------------------------------------------------------------------


def test_openai_stream_through_the_app(fake_vllm, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASLLM_HOME", str(model_dir / "home"))
    engine = VllmEngine(model_dir, EngineConfig(engine="vllm"), "tiny-hf")
    app = create_app(ServerConfig(api_only=True, sampling=SamplingDefaults(max_new_tokens=8)), engine)
    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        body = {"model": "tiny-hf", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert text == "Hello world"
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    ((prompt, params, _),) = fake_vllm.instances[0].generate_calls
    rendered = "".join(chr(i) for i in prompt["prompt_token_ids"][1:])
    assert rendered == "<user>hi<assistant>"  # the tokenizer's chat template, then its tokens
    assert params.kwargs["max_tokens"] == 8


def test_no_prefix_cache_flag_turns_vllms_prefix_caching_off(tmp_path: Path) -> None:
    _, engine = configs_from(build_parser().parse_args(["serve", "--engine", "vllm", "--no-prefix-cache"]))
    assert engine_args(tmp_path, engine)["enable_prefix_caching"] is False
    _, default = configs_from(build_parser().parse_args(["serve", "--engine", "vllm"]))
    assert engine_args(tmp_path, default)["enable_prefix_caching"] is True
