"""One request's answer on its way from an engine thread to the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from easllm.engine.types import TokenDelta

Item = TokenDelta | BaseException  # a delta, or the error that ends the request


@dataclass
class Stream:
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    out: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)

    def put(self, item: Item) -> None:
        """From any thread; dropped when the caller's event loop is already closed."""
        put_all([(self, item)])

    async def deltas(self, abort: Callable[[], Awaitable[None]]) -> AsyncGenerator[TokenDelta, None]:
        """The deltas until the one with `finish_reason`; an error item is raised. A caller that
        stops reading before the last delta (closes this iterator) calls `abort`."""
        finished = False
        try:
            while not finished:
                item = await self.out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:  # the client went away (after an error, the abort finds nothing)
                await abort()


def put_all(items: list[tuple[Stream, Item]]) -> None:
    """Hand many items over from an engine thread, one hop per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream.out, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens
            loop.call_soon_threadsafe(_put_now, batch)


def _put_now(batch: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for out, item in batch:
        out.put_nowait(item)
