"""Stream writers: deltas -> bytes on the wire. A disconnect closes the delta stream (and so aborts
the generation); a failure after the 200 has gone out is one error chunk, then the stream ends."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from easllm.engine.types import TokenDelta
from easllm.errors import failure
from easllm.protocol.eas import RoundReplies


def error_json(exc: BaseException) -> str:
    """The error policy's answer to `exc` as one JSON object (`{"error": {...}}`)."""
    return json.dumps(failure(exc).body(), ensure_ascii=False)


async def eas_chunks(
    deltas: AsyncGenerator[TokenDelta, None],
    replies: RoundReplies,
    delta_mode: bool,
    sources: list[dict[str, Any]] | None,
) -> AsyncGenerator[tuple[str, str, TokenDelta]]:
    """(reply JSON, answer so far, delta) for each delta with text or a finish reason; the last
    reply carries usage, finish reason and sources. Ends after the finish reason."""
    text = ""
    async with aclosing(deltas):
        async for delta in deltas:
            if not delta.text and delta.finish_reason is None:
                continue
            text += delta.text
            done = delta.finish_reason is not None
            shown = delta.text if delta_mode else text
            yield (
                replies.dumps(shown, text, delta.usage, delta.finish_reason, sources if done else None),
                text,
                delta,
            )
            if done:
                return


async def nul_delimited(
    deltas: AsyncGenerator[TokenDelta, None],
    replies: RoundReplies,
    delta_mode: bool,
    sources: list[dict[str, Any]] | None,
) -> AsyncIterator[bytes]:
    """The EAS stream: each reply as one JSON object followed by NUL; a failure mid-stream is one
    `{"error": ...}` object and NUL, then the stream ends."""
    async with aclosing(eas_chunks(deltas, replies, delta_mode, sources)) as chunks:
        try:
            async for chunk, _, _ in chunks:
                yield chunk.encode() + b"\0"
        except Exception as exc:
            yield error_json(exc).encode() + b"\0"
