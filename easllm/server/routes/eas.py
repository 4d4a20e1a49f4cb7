"""`POST /`: the EAS protocol — string and JSON requests, NUL-delimited streaming."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from easllm.errors import InvalidRequest
from easllm.protocol.eas import EasRequest, RoundReplies, parse_eas_body, reply
from easllm.protocol.schema import json_body
from easllm.server.auth import require_token
from easllm.server.state import State, http_caller
from easllm.server.streaming import nul_delimited
from easllm.serving.chat import Turn

router = APIRouter(dependencies=[Depends(require_token)])


@router.post(
    "/", response_model=None, openapi_extra=json_body(EasRequest, plain_text="the prompt itself, one round")
)
async def predict(request: Request, state: State) -> Response:
    parsed = parse_eas_body(await request.body(), request.headers.get("content-type"))
    eas = EasRequest(prompt=parsed) if isinstance(parsed, str) else parsed
    if not eas.prompt:
        raise InvalidRequest("prompt is required", "prompt")
    sampling = eas.sampling(state.config.sampling)
    turn = Turn("eas", eas.conversation(), sampling, eas.no_template, use_knowledge=eas.langchain)
    generation = await state.chat.converse(turn, http_caller(request))
    sources = [asdict(s) for s in generation.sources] if eas.langchain else None
    if eas.use_stream_chat and not isinstance(parsed, str):
        replies = RoundReplies(eas.history, eas.prompt)
        body = nul_delimited(generation.streams[0], replies, eas.stream_format == "delta", sources)
        return StreamingResponse(body, media_type="application/octet-stream")
    choices = await generation.collect()
    if choices is None:
        return Response(status_code=499)
    answer = choices[0]
    if isinstance(parsed, str):
        return PlainTextResponse(answer.text)
    history = [*eas.history, (eas.prompt, answer.text)]
    usage = generation.usage(answer)
    return JSONResponse(reply(answer.text, history, usage, answer.finish_reason, sources))
