"""Turn pydantic's validation errors into one InvalidRequest naming the field."""

from __future__ import annotations

from pydantic import ValidationError

from easllm.errors import InvalidRequest


def invalid_request_from(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}", param=param)
