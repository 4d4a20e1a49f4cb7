"""A GBNF grammar constraint for one sequence, on llama.cpp's grammar sampler."""

from __future__ import annotations

import ctypes
import math
import re
from typing import Any

import numpy as np

from easllm.errors import InvalidRequest

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class LlamaGrammar:
    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, triggers: tuple[str, ...] = ()) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self._n_vocab = n_vocab
        if triggers:  # lazy: free text until a trigger, then the grammar from the trigger on
            patterns = (ctypes.c_char_p * len(triggers))(*(re.escape(t).encode() for t in triggers))
            self._sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, gbnf.encode(), b"root", patterns, len(triggers), None, 0
            )
        else:
            self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise InvalidRequest("the grammar does not parse as GBNF with a `root` rule", "grammar")
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array()

    def allows(self, token: int) -> bool:
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._apply(ctypes.cast(self._one, ctypes.POINTER(self._llama.llama_token_data)), 1, self._one_array)
        return math.isfinite(self._one[0].logit)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        data = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        data["id"] = np.arange(self._n_vocab, dtype=np.int32)
        data["logit"] = logits[: self._n_vocab]
        data["p"] = 0.0
        pointer = data.ctypes.data_as(ctypes.POINTER(self._llama.llama_token_data))
        self._apply(pointer, self._n_vocab, self._llama.llama_token_data_array())
        return data["logit"].copy()  # the grammar sampler sets logits in place, in id order

    def accept(self, token: int) -> None:
        self._llama.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            self._llama.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        self.close()

    def _apply(self, data: Any, size: int, array: Any) -> None:
        array.data, array.size, array.selected, array.sorted = data, size, -1, False
        self._llama.llama_sampler_apply(self._sampler, ctypes.byref(array))
