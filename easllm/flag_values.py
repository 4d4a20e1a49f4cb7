"""The value types of `easllm serve`'s flags: text -> a checked value, or argparse's error naming it."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

REPLICA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def ranged(
    kind: type[float] | type[int], low: float | None = None, high: float | None = None, low_open: bool = False
) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value: float | int = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from exc
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = f"> {low}" if low_open else f">= {low}"
            rng = f"{lo} and <= {high}" if high is not None else lo
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {rng})")
        return value

    return parse


def replica_name(text: str) -> str:
    if not REPLICA_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r}: use 1-64 letters, digits, _ and - (it goes into file names)"
        )
    return text


def embedding_model(text: str) -> str:
    from easllm.rag.embedder import embedder_name

    try:
        return embedder_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def quantization(text: str) -> str:
    from easllm.models.pull import QUANT_NAME

    if not QUANT_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, _ . - (at most 32), e.g. Q4_K_M")
    return text.upper()


def host_list(text: str) -> list[str]:
    """One `--allowed-hosts` value: comma-separated names (`action="extend"` joins repeats)."""
    return [h.strip() for h in text.split(",") if h.strip()]
