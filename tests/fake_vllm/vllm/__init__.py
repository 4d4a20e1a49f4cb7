"""Fake vLLM: the top-level names easllm's adapter imports."""

from typing import Any

from vllm.sampling_params import SamplingParams

__version__ = "0.0.fake"
__all__ = ["AsyncEngineArgs", "SamplingParams"]


class AsyncEngineArgs:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
