"""Stream writers: engine deltas -> bytes on the wire. Disconnects close the delta stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from starlette.requests import Request

from easllm.chat.service import Answer, collect
from easllm.engine.types import TokenDelta


async def first_then_rest(deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
    """Pull the first delta now, so queue-full and engine errors become a status code, not a
    broken 200 stream; the returned iterator replays it."""
    first = await anext(deltas)

    async def replay() -> AsyncIterator[TokenDelta]:
        async with aclosing(deltas):
            yield first
            if first.finish_reason is None:
                async for delta in deltas:
                    yield delta

    return replay()


async def nul_delimited(
    deltas: AsyncIterator[TokenDelta],
    chunk: Callable[[str, str, TokenDelta], str],
) -> AsyncIterator[bytes]:
    """Each update as one JSON object followed by NUL; `chunk(text_so_far, new_text, delta)` is its text."""
    text = ""
    async with aclosing(deltas):
        async for delta in deltas:
            if not delta.text and delta.finish_reason is None:
                continue
            text += delta.text
            yield chunk(text, delta.text, delta).encode() + b"\0"


async def collect_unless_disconnected(
    deltas: AsyncIterator[TokenDelta], request: Request, poll: float = 0.2
) -> Answer | None:
    """The whole answer, or None when the client goes away first (generation is aborted)."""
    task = asyncio.ensure_future(collect(deltas))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
