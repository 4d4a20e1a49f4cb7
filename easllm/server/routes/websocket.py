"""`ws://host/`: the EAS WebSocket API — many rounds on one connection, each answer ended by `<EOS>`.

A reader task keeps receiving (so a close or a vanished client is seen mid-answer) and queues
messages; an answerer takes them one at a time, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected

from easllm.chat.dialogue import Dialogue
from easllm.config import LimitsConfig
from easllm.engine.types import TokenDelta
from easllm.errors import EngineError, InvalidRequest, TooLarge
from easllm.protocol.eas import EasRequest, RoundReplies, parse_eas_body
from easllm.server.auth import check_token
from easllm.server.errors import error_response
from easllm.server.limits import body_limit
from easllm.server.lockout import busy_message
from easllm.server.state import ServiceState, State, websocket_caller
from easllm.server.streaming import eas_chunks, error_json
from easllm.serving.chat import Turn
from easllm.serving.choices import Generation

log = logging.getLogger(__name__)
router = APIRouter()

EOS = "<EOS>"
MAX_PENDING = LimitsConfig.ws_max_pending  # the default of messages waiting for an answer (1008 beyond)
PER_MESSAGE = frozenset({"prompt", "history", "langchain"})  # every other field set stays in force
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


@router.websocket("/")
async def dialogue_socket(websocket: WebSocket, state: State) -> None:
    token = state.config.token
    if token:
        # Browsers cannot set headers on a WebSocket: they pass ?token= instead.
        client = websocket.client.host if websocket.client else None
        presented = (websocket.headers.get("authorization"), websocket.query_params.get("token"))
        verdict = await check_token(state.failed_tokens, client, token, *presented)
        if verdict != 200:
            await _refuse(websocket, verdict)
            return
    await websocket.accept()
    await Connection(websocket, state).run()


async def _refuse(websocket: WebSocket, status: int) -> None:
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        if status == 429:
            denial = error_response(429, busy_message())
        else:
            denial = error_response(401, "missing or wrong token in the Authorization header or ?token=")
        await websocket.send_denial_response(denial)
    else:  # a server without the denial-response extension answers a close before accept with 403
        await websocket.close(code=CLOSE_POLICY)


class Connection:
    """One client: its dialogue, the settings its messages made sticky, and its message queue."""

    def __init__(self, websocket: WebSocket, state: ServiceState) -> None:
        config = state.config
        self.websocket = websocket
        self.chat = state.chat
        self.caller = websocket_caller(websocket)
        self.defaults = config.sampling
        self.dialogue = Dialogue(config.max_round)
        self.settings = EasRequest()
        self.max_pending = config.limits.ws_max_pending
        self.max_message = body_limit(config)
        self.all_pending = state.ws_pending
        self.pending_bytes = 0  # queued unanswered: at most one message of the largest size
        # an oversized message waits its turn as its refusal, so answers stay in order
        self.inbox: asyncio.Queue[tuple[str | bytes | TooLarge, int]] = asyncio.Queue(self.max_pending)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        answerer = asyncio.create_task(self._answer_in_order())
        try:
            await asyncio.wait({reader, answerer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, answerer):
                task.cancel()  # a generation still running is aborted in the engine
            # not gather: it would replace the caller's own cancellation with the children's
            await asyncio.wait({reader, answerer})
            self.all_pending.give_back(self.pending_bytes)
            self.pending_bytes = 0
        error = answerer.exception() if answerer.done() and not answerer.cancelled() else None
        # WebSocketDisconnected: an answer finished after the reader had closed the connection
        if error is not None and not isinstance(error, WebSocketDisconnect | WebSocketDisconnected):
            log.error("websocket answerer failed", exc_info=error)
            await self._close(CLOSE_INTERNAL, "internal error")

    async def _read(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                log.debug("websocket closed by the client (code %s)", message.get("code"))
                return
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            item: str | bytes | TooLarge = data
            size = len(data.encode() if isinstance(data, str) else data)
            if size > self.max_message:
                item = TooLarge(
                    f"the message is {size} bytes; the limit is {self.max_message} (--max-body-mb)", "body"
                )
                size = 0  # only the refusal waits
            if self.inbox.full():
                reason = f"more than {self.max_pending} messages waiting for an answer (--ws-max-pending)"
                await self._close(CLOSE_POLICY, reason)
                return
            if self.pending_bytes + size > self.max_message:
                reason = f"more than {self.max_message} bytes waiting for an answer (--max-body-mb)"
                await self._close(CLOSE_POLICY, reason)
                return
            if not self.all_pending.take(size):
                await self._close(
                    CLOSE_TRY_AGAIN, "the server holds too many unanswered messages: retry later"
                )
                return
            self.pending_bytes += size
            self.inbox.put_nowait((item, size))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # already closed
            await self.websocket.close(code, reason)

    async def _answer_in_order(self) -> None:
        while True:
            data, size = await self.inbox.get()
            self.pending_bytes -= size
            self.all_pending.give_back(size)
            try:
                await self._answer(data)
            except (WebSocketDisconnect, WebSocketDisconnected):
                raise
            except Exception as exc:
                await self.websocket.send_text(error_json(exc))
            await self.websocket.send_text(EOS)

    async def _answer(self, data: str | bytes | TooLarge) -> None:
        if isinstance(data, TooLarge):
            raise data
        msg = _parse(data)
        self._apply(msg)
        if not msg.prompt:
            raise InvalidRequest("prompt is required; the other fields of this message were kept", "prompt")
        conv = self.dialogue.conversation(msg.prompt)
        sampling = self.settings.sampling(self.defaults)
        turn = Turn("websocket", conv, sampling, self.settings.no_template, use_knowledge=msg.langchain)
        await self._write(msg, await self.chat.converse(turn, self.caller))

    def _apply(self, msg: EasRequest) -> None:
        """Make the fields this message set stick; `history` replaces the dialogue's rounds."""
        sticky = msg.model_fields_set - PER_MESSAGE
        self.settings = self.settings.model_copy(update={name: getattr(msg, name) for name in sticky})
        if "system_prompt" in sticky:
            self.dialogue.system_prompt = msg.system_prompt
        if "history" in msg.model_fields_set:
            self.dialogue.replace_rounds(msg.history)

    async def _write(self, msg: EasRequest, generation: Generation) -> None:
        streaming = self.settings.use_stream_chat is not False  # true unless the client said false
        sources = [asdict(s) for s in generation.sources] if msg.langchain else None
        replies = RoundReplies(self.dialogue.rounds, msg.prompt)
        delta_mode = self.settings.stream_format == "delta"
        last: tuple[str, str, TokenDelta] | None = None
        async with contextlib.aclosing(
            eas_chunks(generation.streams[0], replies, delta_mode, sources)
        ) as chunks:
            async for chunk, text, delta in chunks:
                if streaming:
                    await self.websocket.send_text(chunk)
                last = chunk, text, delta
        if last is None or last[2].finish_reason is None:
            raise EngineError("the engine stream ended without a finish reason")
        _, text, delta = last
        if not streaming:
            await self.websocket.send_text(
                replies.dumps(text, text, delta.usage, delta.finish_reason, sources)
            )
        self.dialogue.record(msg.prompt, text)


def _parse(data: str | bytes) -> EasRequest:
    """A JSON object is a request; other text is the prompt. Text starting with `{` must parse."""
    raw = data.encode() if isinstance(data, str) else data
    looks_like_json = raw.lstrip()[:1] == b"{"
    parsed = parse_eas_body(raw, "application/json" if looks_like_json else None)
    return EasRequest(prompt=parsed) if isinstance(parsed, str) else parsed
