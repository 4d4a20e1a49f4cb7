"""Hugging Face transformers: a model directory (config.json) on CPU or GPU, one request at a time.

`load_model` is shared with the continuous-batching engine (transformers_batching.py), which
hands this engine its loaded model for the requests continuous batching cannot serve.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.backends.transformers_detokenizer import HFDetokenizer
from easllm.engine.sequential import SequentialEngine
from easllm.engine.types import GenerationRequest, ModelInfo, SamplingParams

log = logging.getLogger(__name__)

_DONE = object()


def choose_dtype(precision: str | None, device: str) -> Any:
    import torch

    if precision:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    info: ModelInfo

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or next(iter(self.eos_ids()), 0)


def load_model(model_dir: Path, config: EngineConfig, display_name: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    dtype = choose_dtype(config.precision, device)
    log.info("loading %s with transformers on %s (%s)", model_dir, device, dtype)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Any: transformers types its decorated `to` as a plain function, not as a bound method
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(device)
    model.eval()
    max_ctx = getattr(model.config, "max_position_embeddings", None) or config.ctx_size
    info = ModelInfo(
        name=display_name,
        engine=TransformersEngine.name,
        context_length=min(int(max_ctx), config.ctx_size),
        chat_template=_chat_template(tok, model_dir),
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
    )
    return LoadedModel(model, tok, device, info)


class TransformersEngine(SequentialEngine):
    name = "transformers"

    def __init__(
        self, model_dir: Path, config: EngineConfig, display_name: str, loaded: LoadedModel | None = None
    ) -> None:
        super().__init__(display_name, config.max_queue)
        self.model_dir = model_dir
        self.config = config
        self._given = loaded  # a model already loaded (by the batching engine): not loaded again
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: set[int] = set()
        self._pad_id = 0
        self.device = "cpu"

    def _load(self) -> ModelInfo:
        loaded = self._given or load_model(self.model_dir, self.config, self.display_name)
        self._model, self._tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self._eos, self._pad_id = loaded.eos_ids(), loaded.pad_id
        return loaded.info

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _generate_tokens(self, req: GenerationRequest) -> Generator[tuple[int, str], None, None]:
        """`generate` runs on a helper thread and hands tokens over a queue; closing this
        iterator sets the stop flag, which the stopping criterion reads at the next token."""
        stop = threading.Event()
        tokens: Queue[Any] = Queue()
        thread = threading.Thread(target=self._run_generate, args=(req, stop, tokens), daemon=True)
        thread.start()
        detokenizer = HFDetokenizer(self._tokenizer)
        try:
            while (item := tokens.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item, detokenizer.push(item)
        finally:
            stop.set()
            thread.join()

    def _run_generate(self, req: GenerationRequest, stop: threading.Event, out: Queue[Any]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        s = req.sampling
        eos_ids = self._eos

        class ToQueue(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first streams the prompt itself
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    if token not in eos_ids:
                        out.put(int(token))

            def end(self) -> None:
                pass

        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "do_sample": False,  # sampling, when asked for, is the last logits processor's
            "repetition_penalty": s.repetition_penalty,
            "eos_token_id": sorted(eos_ids) or None,
            "pad_token_id": self._pad_id,
            "streamer": ToQueue(),
            "stopping_criteria": StoppingCriteriaList([Stopped()]),
            "logits_processor": [] if s.greedy else _sampling(s),
        }
        try:
            input_ids = torch.tensor([req.prompt_token_ids], device=self.device)
            with torch.inference_mode():
                self._model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        except Exception as exc:
            out.put(exc)
        finally:
            out.put(_DONE)


def _sampling(s: SamplingParams) -> list[Any]:
    """Temperature, top-k, top-p, then a draw from the request's own random generator, so that a
    seed gives the same answer whatever else runs (generate's own draw uses torch's global one,
    which the continuous-batching thread draws from too)."""
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator()
    generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(2**62, (1,), generator=None)))

    class Draw(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            probs = torch.softmax(scores.float(), dim=-1).cpu()
            picks = torch.multinomial(probs, 1, generator=generator).to(scores.device)
            return torch.full_like(scores, -math.inf).scatter_(1, picks, 0.0)  # generate's argmax takes it

    warpers: list[Any] = [TemperatureLogitsWarper(s.temperature)]
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(s.top_p))
    return [*warpers, Draw()]


def _chat_template(tokenizer: Any, model_dir: Path) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("chat_template")
        if isinstance(value, str):
            return value
    return None
