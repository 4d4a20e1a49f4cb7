"""A GBNF grammar constraint for one sequence, on llama.cpp's grammar sampler."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from easllm.errors import InvalidRequest

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class LlamaGrammar:
    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, triggers: tuple[str, ...] = ()) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self._n_vocab = n_vocab
        self._sampler = self._lazy(vocab, gbnf, triggers) if triggers else self._strict(vocab, gbnf)
        # Any: llama_cpp annotates the fields as their ctypes (c_int32), which read and take Python numbers
        self._one: Any = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array()

    def _strict(self, vocab: Any, gbnf: str) -> Any:
        sampler = self._llama.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InvalidRequest("the grammar does not parse as GBNF with a `root` rule", "grammar")
        return sampler

    def _lazy(self, vocab: Any, gbnf: str, triggers: tuple[str, ...]) -> Any:
        """Free text until a trigger token, then the grammar, whose root starts with the trigger's
        text. Single-token triggers only: on a text trigger llama.cpp replays the whole last token
        into the grammar, and the process aborts if the grammar rejects it. None: no trigger is
        one token, so the text stays free (the caller checks it afterwards)."""
        tokens = [t for t in (_single_token(vocab, text) for text in triggers) if t is not None]
        if not tokens:
            return None
        ids = (self._llama.llama_token * len(tokens))(*tokens)
        sampler = self._llama.llama_sampler_init_grammar_lazy_patterns(
            vocab, gbnf.encode(), b"root", None, 0, ids, len(tokens)
        )
        if not sampler:
            raise InvalidRequest("the grammar does not parse as GBNF with a `root` rule", "grammar")
        return sampler

    def allows(self, token: int) -> bool:
        if not self._sampler:
            return True  # a lazy grammar without a single-token trigger: free text
        one = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._apply(ctypes.cast(self._one, ctypes.POINTER(self._llama.llama_token_data)), 1, self._one_array)
        return math.isfinite(self._one[0].logit)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        if not self._sampler:
            return logits
        data = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
        data["id"] = np.arange(self._n_vocab, dtype=np.int32)
        data["logit"] = logits[: self._n_vocab]
        data["p"] = 0.0
        pointer = data.ctypes.data_as(ctypes.POINTER(self._llama.llama_token_data))
        self._apply(pointer, self._n_vocab, self._llama.llama_token_data_array())
        return data["logit"].copy()  # the grammar sampler sets logits in place, in id order

    def accept(self, token: int) -> None:
        if self._sampler:
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


def _single_token(vocab: Any, text: str) -> int | None:
    """The id of the one token `text` is, or None when it takes several."""
    import llama_cpp

    raw = text.encode()
    out = (llama_cpp.llama_token * 4)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), out, 4, False, True)
    return out[0] if n == 1 else None
