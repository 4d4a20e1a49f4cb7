"""Hugging Face transformers: a model directory (config.json) on CPU or GPU, one request at a time."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Any

from easllm.config import EngineConfig
from easllm.engine.sequential import SequentialEngine
from easllm.engine.types import GenerationRequest, ModelInfo

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


class TransformersEngine(SequentialEngine):
    name = "transformers"

    def __init__(self, model_dir: Path, config: EngineConfig, display_name: str) -> None:
        super().__init__(display_name, config.max_queue)
        self.model_dir = model_dir
        self.config = config
        self._model: Any = None
        self._tokenizer: Any = None
        self.device = "cpu"

    def _load(self) -> ModelInfo:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.device = "cuda" if torch.cuda.is_available() and not self.config.cpu else "cpu"
        dtype = choose_dtype(self.config.precision, self.device)
        log.info("loading %s with transformers on %s (%s)", self.model_dir, self.device, dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, local_files_only=True
        ).to(self.device)
        self._model.eval()
        tok = self._tokenizer
        max_ctx = getattr(self._model.config, "max_position_embeddings", None) or self.config.ctx_size
        return ModelInfo(
            name=self.display_name,
            engine=self.name,
            context_length=min(int(max_ctx), self.config.ctx_size),
            chat_template=_chat_template(tok, self.model_dir),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
        )

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _generate_tokens(self, req: GenerationRequest) -> Iterator[tuple[int, str]]:
        """`generate` runs on a helper thread and hands tokens over a queue; closing this
        iterator sets the stop flag, which the stopping criterion reads at the next token."""
        stop = threading.Event()
        tokens: Queue[Any] = Queue()
        thread = threading.Thread(target=self._run_generate, args=(req, stop, tokens), daemon=True)
        thread.start()
        ids: list[int] = []
        text = ""
        try:
            while (item := tokens.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                ids.append(item)
                full = self._tokenizer.decode(ids, skip_special_tokens=True)
                if full.endswith("\ufffd"):
                    yield item, ""  # a multi-byte character is not complete yet
                    continue
                yield item, full[len(text) :]
                text = full
        finally:
            stop.set()
            thread.join()

    def _eos_ids(self) -> set[int]:
        eos = self._model.generation_config.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    def _run_generate(self, req: GenerationRequest, stop: threading.Event, out: Queue[Any]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        s = req.sampling
        eos_ids = self._eos_ids()

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
            "do_sample": not s.greedy,
            "repetition_penalty": s.repetition_penalty,
            "eos_token_id": sorted(eos_ids) or None,
            "pad_token_id": self._tokenizer.pad_token_id or next(iter(eos_ids), 0),
            "streamer": ToQueue(),
            "stopping_criteria": StoppingCriteriaList([Stopped()]),
        }
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
        try:
            if s.seed is not None:
                torch.manual_seed(s.seed)
            input_ids = torch.tensor([req.prompt_token_ids], device=self.device)
            with torch.inference_mode():
                self._model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        except Exception as exc:
            out.put(exc)
        finally:
            out.put(_DONE)


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
