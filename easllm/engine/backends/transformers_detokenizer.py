"""Token ids -> text with a Hugging Face tokenizer, one token at a time.

A HF tokenizer decodes whole sequences (a token's text can depend on its neighbours: leading
spaces, bytes of one character split over tokens), so each new token decodes a short window of
the latest tokens and the text it adds over the window without it is emitted; text that ends in
an incomplete character is held back until the next token completes it (the
sequential engine and vLLM drop one still incomplete at the end).
"""

from __future__ import annotations

from typing import Any


class HFDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # text up to here was emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        seen, full = self._texts()
        if len(full) <= len(seen) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character is not complete
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(seen) :]

    def _texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix :]
        seen = self._decode(window[: self._read - self._prefix])
        return seen, self._decode(window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
