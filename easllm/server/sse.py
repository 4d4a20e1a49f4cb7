"""Server-sent events (the OpenAI stream format).

Each event is one `data: <json>` line and a blank line; the stream ends with `data: [DONE]`.
An error after the 200 has gone out becomes one `data: {"error": ...}` event (the error policy's
answer), which the `openai` SDK raises as an APIError. Closing the iterator closes the engine
streams under it, and so aborts their generation (a client disconnect does this through Starlette).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from easllm.errors import failure

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def sse_bytes(events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async with aclosing(events):
        try:
            async for data in events:
                yield event(data)
        except Exception as exc:
            yield event(failure(exc).body())
            return
    yield DONE


def sse_response(events: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(sse_bytes(events), media_type="text/event-stream", headers=headers)
