"""Fake vllm.sampling_params: keeps every keyword it is built with, checks what vLLM checks."""

from typing import Any


class StructuredOutputsParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.grammar = kwargs.get("grammar")


class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM < 0.10.2 called it this (SamplingParams(guided_decoding=...))."""


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.logprobs = kwargs.get("logprobs")
        top_k = kwargs.get("top_k", 0)
        if top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        if not -2.0 <= kwargs.get("presence_penalty", 0.0) <= 2.0:
            raise ValueError("presence_penalty must be in [-2, 2]")
