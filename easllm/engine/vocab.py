"""What the engine needs to know of a model's vocabulary: the bytes of a token, and which tokens end."""

from __future__ import annotations

from typing import Protocol


class Vocab(Protocol):
    size: int  # token ids are 0 .. size - 1

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether the token ends generation (EOS, EOT, ...)."""
        ...
