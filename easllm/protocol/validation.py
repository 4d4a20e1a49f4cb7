"""Turn pydantic's validation errors into one InvalidRequest naming the field."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, StrictStr, ValidationError

from easllm.errors import InvalidRequest


def invalid_request_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=param)


def _stop_as_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _no_empty_stop(value: list[str]) -> list[str]:
    if any(s == "" for s in value):
        raise ValueError("stop strings must not be empty")
    return value


# `stop`: one string or a list of them, never an empty one (EAS and OpenAI alike)
StopStrings = Annotated[list[StrictStr], BeforeValidator(_stop_as_list), AfterValidator(_no_empty_stop)]
