"""`POST /`: the EAS protocol — string and JSON requests, NUL-delimited streaming."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from easllm.chat.service import ChatService
from easllm.chat.template import Conversation
from easllm.config import SamplingDefaults
from easllm.engine.types import SamplingParams, TokenDelta
from easllm.errors import InvalidRequest
from easllm.protocol.eas import EasRequest, parse_eas_body, reply
from easllm.server.auth import require_token
from easllm.server.streaming import collect_unless_disconnected, first_then_rest, nul_delimited

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(require_token)])


def sampling_for(req: EasRequest, defaults: SamplingDefaults) -> SamplingParams:
    temperature = defaults.temperature if req.temperature is None else req.temperature
    top_k = req.top_k if req.top_k is not None else (defaults.top_k or 0)
    top_p = req.top_p if req.top_p is not None else (defaults.top_p or 1.0)
    return SamplingParams(
        max_new_tokens=min(req.max_new_tokens or defaults.max_new_tokens, defaults.max_new_tokens),
        temperature=temperature if req.do_sample else 0.0,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=tuple(req.stop),
    )


@router.post("/", response_model=None)
async def predict(request: Request) -> Response:
    service: ChatService = request.app.state.chat
    parsed = parse_eas_body(await request.body(), request.headers.get("content-type"))
    as_text = isinstance(parsed, str)
    eas = EasRequest(prompt=parsed) if isinstance(parsed, str) else parsed
    if eas.langchain:
        raise InvalidRequest("this service has no knowledge base (langchain) yet", "langchain")
    if not eas.prompt:
        raise InvalidRequest("prompt is required", "prompt")
    conv = Conversation(eas.prompt, eas.system_prompt, tuple(eas.history))
    sampling = sampling_for(eas, request.app.state.config.sampling)
    gen = service.prepare(conv, sampling, eas.no_template)
    deltas = await first_then_rest(service.stream(gen))
    history = [*eas.history]

    if eas.use_stream_chat and not as_text:
        delta_mode = eas.stream_format == "delta"

        def chunk(so_far: str, new: str, delta: TokenDelta) -> dict[str, Any]:
            return reply(
                new if delta_mode else so_far,
                [*history, (eas.prompt, so_far)],
                delta.usage,
                delta.finish_reason,
            )

        return StreamingResponse(nul_delimited(deltas, chunk), media_type="application/octet-stream")

    answer = await collect_unless_disconnected(deltas, request)
    if answer is None:
        log.info("client went away; request %s aborted", gen.request_id)
        return Response(status_code=499)
    if as_text:
        return PlainTextResponse(answer.text)
    body = reply(answer.text, [*history, (eas.prompt, answer.text)], answer.usage, answer.finish_reason)
    return JSONResponse(body)
