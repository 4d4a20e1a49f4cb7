"""The choices of one call: started streams, merged in arrival order, or collected whole.

Closing an iterator closes the engine streams under it, and so aborts their generation (Starlette
does it for a client that disconnects from a stream); a collect stops when the caller is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from easllm.engine.types import TokenDelta, Usage
from easllm.errors import EngineError
from easllm.protocol.openai_replies import ChoiceOutput
from easllm.serving.caller import Caller
from easllm.serving.prompts import Source
from easllm.serving.tools import ChatTools

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL = 0.2  # seconds between checks that a caller waiting for a whole answer is still there


@dataclass
class Generation:
    """What the serving layer hands back: one observed stream per choice, the first one started
    (so a full queue or a failed prompt is an error before any answer is written)."""

    streams: list[AsyncGenerator[TokenDelta, None]]
    prompt_tokens: int  # over all prompts (a completion may send several)
    sources: list[Source] = field(default_factory=list)
    tools: ChatTools | None = None
    caller: Caller = field(default_factory=Caller)

    def deltas(self) -> AsyncGenerator[tuple[int, TokenDelta], None]:
        """(choice index, delta) as they arrive."""
        return merge_choices(self.streams)

    async def collect(self) -> list[ChoiceOutput] | None:
        """Every choice whole (tool calls settled), or None when the caller went away first."""
        choices = await until_disconnected(collect_choices(self.streams), self.caller)
        if choices is not None and self.tools is not None:
            for choice in choices:
                self.tools.settle(choice)
        return choices

    def usage(self, choice: ChoiceOutput) -> Usage:
        """A collected choice's usage, for a call with one prompt (what the EAS reply shows)."""
        return Usage(self.prompt_tokens, choice.completion_tokens, choice.cached_tokens)


async def first_then_rest(deltas: AsyncGenerator[TokenDelta, None]) -> AsyncGenerator[TokenDelta, None]:
    """Pull the first delta now, so queue-full and engine errors become a status code, not a
    broken 200 stream; the returned iterator replays it."""
    first = await anext(deltas)

    async def replay() -> AsyncGenerator[TokenDelta, None]:
        async with aclosing(deltas):
            yield first
            if first.finish_reason is None:
                async for delta in deltas:
                    yield delta

    return replay()


async def merge_choices(
    streams: Sequence[AsyncGenerator[TokenDelta, None]],
) -> AsyncGenerator[tuple[int, TokenDelta], None]:
    """(choice index, delta) from several streams, in arrival order; one stream passes straight through."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, TokenDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[TokenDelta, None]) -> None:
        try:
            async with aclosing(stream) as deltas:
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


async def collect_choices(streams: Sequence[AsyncGenerator[TokenDelta, None]]) -> list[ChoiceOutput]:
    choices = [ChoiceOutput(i) for i in range(len(streams))]
    async for index, delta in merge_choices(streams):
        out = choices[index]
        out.text += delta.text
        out.logprobs.extend(delta.logprobs or [])
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.completion_tokens = delta.usage.completion_tokens if delta.usage else 0
            out.cached_tokens = delta.usage.cached_tokens if delta.usage else 0
    for out in choices:
        if out.finish_reason is None:
            raise EngineError("the engine stream ended without a finish reason")
    return choices


async def until_disconnected(work: Awaitable[T], caller: Caller, poll: float = POLL) -> T | None:
    """The result, or None when the caller goes away first (the work is cancelled: generation aborts)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if caller.is_disconnected is not None and await caller.is_disconnected():
                log.info("client went away; request %s aborted", caller.request_id)
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
