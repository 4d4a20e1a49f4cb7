"""`POST /`: the EAS protocol — string and JSON requests, NUL-delimited streaming."""

from __future__ import annotations

import logging
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from easllm.chat.service import ChatService
from easllm.engine.types import TokenDelta
from easllm.errors import InvalidRequest
from easllm.protocol.eas import EasRequest, RoundReplies, parse_eas_body, reply
from easllm.protocol.schema import json_body
from easllm.server.auth import require_token
from easllm.server.streaming import collect_unless_disconnected, first_then_rest, nul_delimited

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_token)])


@router.post(
    "/", response_model=None, openapi_extra=json_body(EasRequest, plain_text="the prompt itself, one round")
)
async def predict(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    parsed = parse_eas_body(await request.body(), request.headers.get("content-type"))
    as_text = isinstance(parsed, str)
    eas = EasRequest(prompt=parsed) if isinstance(parsed, str) else parsed
    if not eas.prompt:
        raise InvalidRequest("prompt is required", "prompt")
    sampling = eas.sampling(request.app.state.config.sampling)
    conv = eas.conversation()
    prepared = await service.prepare_async(conv, sampling, eas.no_template, use_knowledge=eas.langchain)
    gen = prepared.request
    sources = [asdict(s) for s in prepared.sources] if eas.langchain else None
    watched = request.app.state.rounds.watch(service.stream(gen), "eas", request, conv, gen, prepared.sources)
    deltas = await first_then_rest(watched)
    history = [*eas.history]

    if eas.use_stream_chat and not as_text:
        delta_mode = eas.stream_format == "delta"
        replies = RoundReplies(history, eas.prompt)

        def chunk(so_far: str, new: str, delta: TokenDelta) -> str:
            return replies.dumps(
                new if delta_mode else so_far,
                so_far,
                delta.usage,
                delta.finish_reason,
                sources if delta.finish_reason is not None else None,
            )

        return StreamingResponse(nul_delimited(deltas, chunk), media_type="application/octet-stream")

    answer = await collect_unless_disconnected(deltas, request)
    if answer is None:
        log.info("client went away; request %s aborted", gen.request_id)
        return Response(status_code=499)
    if as_text:
        return PlainTextResponse(answer.text)
    body = reply(
        answer.text, [*history, (eas.prompt, answer.text)], answer.usage, answer.finish_reason, sources
    )
    return JSONResponse(body)
