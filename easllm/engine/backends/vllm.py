"""vLLM's async engine behind our Engine interface: GPUs, paged attention, its own batching.

vLLM is an optional extra (`pip install 'easllm[vllm]'`, on a machine with CUDA) and is imported
here only, when the engine starts. Written against vLLM's V1 `AsyncLLM` (`EngineClient.generate`
yields `RequestOutput`s whose text and token ids are cumulative; this adapter turns them into
deltas). Grammars go through `StructuredOutputsParams` (vLLM >= 0.10.2) or, on older releases,
`GuidedDecodingParams`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.base import EngineError, EngineOverloaded
from easllm.engine.types import (
    FEATURES,
    EngineHealth,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    Usage,
)
from easllm.errors import InvalidRequest, NotReady

log = logging.getLogger(__name__)
INSTALL_HINT = (
    "the vLLM engine needs vLLM, which runs on NVIDIA GPUs: pip install 'easllm[vllm]' on a machine "
    "with CUDA (or use --engine transformers / llamacpp)"
)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default, when its config does not say


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> SimpleNamespace:
    """The few vLLM names this adapter uses (a namespace, so a fake module can stand in)."""
    try:
        import vllm
        import vllm.sampling_params as sp
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise EngineError(f"{INSTALL_HINT} ({exc})") from exc
    return SimpleNamespace(
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=vllm.AsyncEngineArgs,
        SamplingParams=vllm.SamplingParams,
        TokensPrompt=TokensPrompt,
        StructuredOutputsParams=getattr(sp, "StructuredOutputsParams", None),
        GuidedDecodingParams=getattr(sp, "GuidedDecodingParams", None),
        version=getattr(vllm, "__version__", "unknown"),
    )


def model_max_length(model_dir: Path) -> int | None:
    """The longest context the model's config.json admits, if it says."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(value := config.get(key), int):
            return value
    return None


def engine_args(model_dir: Path, config: EngineConfig) -> dict[str, Any]:
    """`AsyncEngineArgs` keywords for this model and our engine settings."""
    longest = model_max_length(model_dir)
    return {
        "model": str(model_dir),
        "tensor_parallel_size": config.tensor_parallel_size,
        "max_model_len": min(config.ctx_size, longest) if longest else config.ctx_size,
        "dtype": DTYPES.get(config.precision or "", "auto"),
        "max_num_seqs": config.max_batch,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_prefix_caching": config.prefix_cache,  # on by default, as in `vllm serve`
        "disable_log_stats": True,
    }


def sampling_kwargs(s: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as vLLM `SamplingParams` keywords (the grammar is added separately)."""
    return {
        "n": 1,
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k if s.top_k > 0 else -1,  # -1: no top-k, accepted by every vLLM release
        "repetition_penalty": s.repetition_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "seed": s.seed,
        "stop": list(s.stop),
        "logprobs": s.logprobs,
        "skip_special_tokens": True,
    }


def vllm_sampling(v: SimpleNamespace, s: SamplingParams) -> Any:
    kwargs = sampling_kwargs(s)
    if s.grammar is not None:
        if v.StructuredOutputsParams is not None:
            kwargs["structured_outputs"] = v.StructuredOutputsParams(grammar=s.grammar)
        elif v.GuidedDecodingParams is not None:
            kwargs["guided_decoding"] = v.GuidedDecodingParams(grammar=s.grammar)
        else:
            raise InvalidRequest(f"vLLM {v.version} has no grammar-constrained decoding", "grammar")
    return v.SamplingParams(**kwargs)


@dataclass
class _Progress:
    """How much of a request's cumulative output has been handed on already."""

    text: int = 0
    tokens: int = 0


def _logprobs(entries: list[Any], top_n: int) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob} dicts -> TokenLogprob, the sampled token first."""
    out = []
    for chosen_id, candidates in entries:
        chosen = candidates[chosen_id]
        top: dict[str, float] = {}
        for lp in sorted(candidates.values(), key=lambda lp: lp.rank):
            if lp.rank <= top_n:  # the sampled token is always there, even outside the top N
                top.setdefault(lp.decoded_token or "", lp.logprob)
        out.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob, top))
    return out


def to_delta(req: GenerationRequest, output: Any, seen: _Progress) -> TokenDelta:
    """The new part of one cumulative RequestOutput; `seen` moves past it."""
    completion = output.outputs[0]
    text = completion.text[seen.text :]
    token_ids = list(completion.token_ids[seen.tokens :])
    logprobs = None
    if req.sampling.logprobs is not None and completion.logprobs is not None:
        fresh = completion.logprobs[seen.tokens : seen.tokens + len(token_ids)]
        logprobs = _logprobs(list(zip(token_ids, fresh, strict=True)), req.sampling.logprobs)
    seen.text, seen.tokens = len(completion.text), len(completion.token_ids)
    reason = FINISH.get(completion.finish_reason) if completion.finish_reason else None
    if output.finished and reason is None:
        reason = FinishReason.STOP
    usage = Usage(len(req.prompt_token_ids), seen.tokens) if reason is not None else None
    return TokenDelta(req.request_id, text, token_ids, reason, usage, logprobs)


class VllmEngine:
    name = "vllm"

    def __init__(self, model_dir: Path, config: EngineConfig, display_name: str) -> None:
        self.model_dir = model_dir
        self.config = config
        self.display_name = display_name
        self._vllm: SimpleNamespace | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._max_in_flight = DEFAULT_MAX_NUM_SEQS + config.max_queue
        self._in_flight = 0
        self._aborted = 0
        self._finished = 0

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise NotReady("the model is still loading")
        return self._info

    async def start(self) -> None:
        v = _import_vllm()
        args = v.AsyncEngineArgs(**engine_args(self.model_dir, self.config))
        log.info("loading %s with vLLM %s", self.model_dir, v.version)
        # building the engine loads the weights and profiles memory: seconds to minutes, off the loop
        self._llm = await asyncio.to_thread(v.AsyncLLM.from_engine_args, args)
        tokenizer = self._llm.get_tokenizer()
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        model_config = getattr(self._llm, "model_config", None)
        scheduler = getattr(getattr(self._llm, "vllm_config", None), "scheduler_config", None)
        max_num_seqs = getattr(scheduler, "max_num_seqs", None) or DEFAULT_MAX_NUM_SEQS
        self._max_in_flight = max_num_seqs + self.config.max_queue
        self._vllm = v
        tok = self._tokenizer
        self._info = ModelInfo(
            name=self.display_name,
            engine=self.name,
            context_length=getattr(model_config, "max_model_len", None) or self.config.ctx_size,
            chat_template=getattr(tok, "chat_template", None) or None,
            bos_token=getattr(tok, "bos_token", None) or "",
            eos_token=getattr(tok, "eos_token", None) or "",
            features=FEATURES,
        )

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if self._tokenizer is None:
            raise NotReady("the model is still loading")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        if self._llm is None or self._vllm is None:
            raise NotReady("the model is still loading")
        if self._in_flight >= self._max_in_flight:
            raise EngineOverloaded("the engine queue is full")
        v = self._vllm
        try:
            params = vllm_sampling(v, req.sampling)
        except ValueError as exc:  # vLLM validates its parameters when they are built
            raise InvalidRequest(str(exc)) from exc
        prompt = v.TokensPrompt(prompt_token_ids=list(req.prompt_token_ids))
        seen = _Progress()
        finished = False
        self._in_flight += 1
        outputs = self._llm.generate(prompt, params, req.request_id)
        try:
            async for output in outputs:
                delta = to_delta(req, output, seen)
                finished = delta.finish_reason is not None
                if delta.text or delta.token_ids or finished:
                    yield delta
                if finished:
                    self._finished += 1
                    return
        except (NotReady, EngineError):
            raise
        except ValueError as exc:  # vLLM's request validation
            raise InvalidRequest(str(exc)) from exc
        except Exception as exc:
            raise EngineError(f"vLLM failed: {exc}") from exc
        finally:
            self._in_flight -= 1
            if not finished:
                await outputs.aclose()
                await self.abort(req.request_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            self._aborted += 1
            await self._llm.abort(request_id)

    def health(self) -> EngineHealth:
        errored = bool(getattr(self._llm, "errored", False))
        details: dict[str, object] = {"tensor_parallel_size": self.config.tensor_parallel_size}
        if errored:
            details["error"] = "the vLLM engine core died"
        return EngineHealth(
            ready=self._info is not None and not errored,
            engine=self.name,
            model=self.display_name,
            running=self._in_flight,
            aborted_total=self._aborted,
            finished_total=self._finished,
            details=details,
        )

    async def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
