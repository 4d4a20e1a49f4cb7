"""Turn pydantic's validation errors into one InvalidRequest naming the field; bounds shared by the
protocols (JSON bodies, stop strings, seeds) and the safe logging of unknown field names."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StrictStr, ValidationError

from easllm.errors import InvalidRequest

MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM and LangChain callers send a few more
MAX_STOP_CHARS = 256  # each one is matched against every new token of its sequence
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # int64 (OpenAI) and uint64 (llama.cpp, torch) seeds
SEED_SPACE = 2**64  # a negative seed is taken modulo 2**64, as its two's complement
# Parsing costs per JSON value, on the event loop and under the GIL: a 3 MB body of 200,000 tiny
# arrays takes ~0.5 s. No request needs this many (history has at most 1,000 rounds, and text
# holding brackets is bounded by the context), so bodies with more are refused before parsing.
MAX_JSON_CONTAINERS = 10_000
UNKNOWN_LOG_INTERVAL = 60.0  # seconds between two logs of unknown field names (the rest are counted)
UNKNOWN_NAMES_SHOWN = 8
UNKNOWN_NAME_CHARS = 40


def invalid_request_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=param)


def check_json_size(body: bytes | str, param: str | None = "body") -> None:
    """Refuse (400) a body with more `[` and `{` than any request needs, before parsing it."""
    raw = body.encode() if isinstance(body, str) else body
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise InvalidRequest(f"the JSON body holds more than {MAX_JSON_CONTAINERS} arrays and objects", param)


def load_json(body: bytes | str, param: str | None = "body") -> Any:
    """Parse a request body; any parse error, including nesting too deep for Python's parser, is a 400."""
    check_json_size(body, param)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", param) from exc
    except RecursionError as exc:
        raise InvalidRequest("the JSON body is nested too deeply", param) from exc


def validate(model: Any, data: Any) -> Any:
    """`model.model_validate(data)`, with every failure (nesting too deep included) as a 400."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from(exc) from exc
    except RecursionError as exc:
        raise InvalidRequest("the JSON body is nested too deeply", "body") from exc


def _stop_as_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:  # before validating each of them
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(value)})")
    return [value] if isinstance(value, str) else value


def _no_empty_stop(value: list[str]) -> list[str]:
    if any(s == "" for s in value):
        raise ValueError("stop strings must not be empty")
    return value


# `stop`: one string or a list of them, never an empty one (EAS and OpenAI alike)
StopStrings = Annotated[
    list[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]],
    BeforeValidator(_stop_as_list),
    Field(max_length=MAX_STOP_STRINGS),
    AfterValidator(_no_empty_stop),
]


def _seed_in_space(value: int | None) -> int | None:
    return None if value is None else value % SEED_SPACE


# `seed`: any int64 or uint64; negative ones map onto [0, 2**64) (numpy and torch refuse them)
Seed = Annotated[int | None, Field(ge=SEED_MIN, le=SEED_MAX), AfterValidator(_seed_in_space)]


def derived_seed(seed: int, offset: int) -> int:
    """The seed of choice `offset` of a request with `seed`, in the same space."""
    return (seed + offset) % SEED_SPACE


class UnknownFieldLog:
    """Logs ignored field names safely: escaped (no forged lines), truncated, and at most once
    per interval per logger (the names seen in between are counted, not stored)."""

    def __init__(self, log: logging.Logger, interval: float = UNKNOWN_LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, where: str, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        self._last = now
        shown = [ascii(name[:UNKNOWN_NAME_CHARS]) for name in names[:UNKNOWN_NAMES_SHOWN]]
        more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
        since = f" ({self._suppressed} more requests with unknown fields since the last log)"
        self.log.info(
            "%s: ignoring unknown fields: %s%s%s",
            where,
            ", ".join(shown),
            more,
            since if self._suppressed else "",
        )
        self._suppressed = 0
