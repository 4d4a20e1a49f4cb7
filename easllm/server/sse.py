"""Server-sent events (the OpenAI stream format) and the merging of several choices' delta streams.

Each event is one `data: <json>` line and a blank line; the stream ends with `data: [DONE]`.
An error after the 200 has gone out becomes one `data: {"error": ...}` event, which the `openai`
SDK raises as an APIError. Closing either iterator closes the engine streams under it, and so
aborts their generation (a client disconnect does this through Starlette).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from easllm.engine.base import EngineOverloaded
from easllm.engine.types import TokenDelta
from easllm.errors import InvalidRequest, NotReady
from easllm.server.errors import error_body

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def sse_bytes(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async with aclosing(events):
        try:
            async for data in events:
                yield event(data)
        except InvalidRequest as exc:
            yield event(error_body(exc.status, exc.message, exc.param))
            return
        except (NotReady, EngineOverloaded) as exc:
            yield event(error_body(503, str(exc)))
            return
        except Exception as exc:
            log.exception("stream failed")
            yield event(error_body(500, f"generation failed: {exc}"))
            return
    yield DONE


def sse_response(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(sse_bytes(events), media_type="text/event-stream", headers=headers)


async def merge_choices(
    streams: Sequence[AsyncIterator[TokenDelta]],
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """(choice index, delta) from several streams, in arrival order; one stream passes straight through."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, TokenDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async with aclosing(stream) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
