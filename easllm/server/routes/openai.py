"""`/v1`: the OpenAI API — models, chat completions, completions (SSE streaming), embeddings.

Each route parses its request (protocol/openai.py), makes one call into the serving layer
(`ChatServing.chat` / `.complete`: prompt, fitting, `n` choices, observation) and writes the reply
or the SSE stream of what comes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict, replace
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from easllm.engine.types import TokenDelta, Usage
from easllm.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_json_object,
)
from easllm.protocol.openai_replies import (
    ChoiceOutput,
    Envelope,
    chat_chunk,
    chat_completion,
    chat_logprobs,
    completion,
    completion_chunk,
    completion_logprobs,
    embedding_list,
    model_card,
    request_usage,
    usage_chunk,
)
from easllm.protocol.schema import json_body
from easllm.server.auth import require_token
from easllm.server.sse import sse_response
from easllm.server.state import ServiceState, State, http_caller
from easllm.serving.chat import ChatCall, CompletionCall
from easllm.serving.tools import ChatTools

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@router.get("/models")
async def list_models(state: State) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [served_model_card(state)]})


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> JSONResponse:
    info = state.engine.model_info
    if model_id != info.name:
        raise HTTPException(404, f"model {model_id!r} is not served here; this service serves {info.name!r}")
    return JSONResponse(served_model_card(state))


def served_model_card(state: ServiceState) -> dict[str, Any]:
    card = model_card(state.engine.model_info, int(time.time()))
    card.update(state.chat.tool_card(card))
    return card


@router.post("/chat/completions", response_model=None, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request, state: State) -> Response:
    req: ChatCompletionRequest = ChatCompletionRequest.parse(parse_json_object(await request.body()))
    info = state.engine.model_info
    call = ChatCall(
        "openai.chat",
        req.messages_native(),
        req.sampling(state.config.sampling, info),
        req.n,
        req.use_knowledge,
        req.tool_request(),
        req.legacy_functions,
    )
    generation = await state.chat.chat(call, http_caller(request))
    extra = {"sources": [asdict(s) for s in generation.sources]} if req.use_knowledge else {}
    top = (req.top_logprobs or 0) if req.logprobs else None
    env = Envelope.new("chatcmpl", "chat.completion", info.name)
    if req.stream:
        chunks = replace(env, object="chat.completion.chunk")
        n, prompt_tokens, tools = len(generation.streams), generation.prompt_tokens, generation.tools
        events = chat_events(
            chunks, generation.deltas(), n, prompt_tokens, req.include_usage(), top, extra, tools
        )
        return sse_response(events)
    choices = await generation.collect()
    if choices is None:
        return Response(status_code=499)
    return JSONResponse(
        chat_completion(env, choices, choices_usage(generation.prompt_tokens, choices), top, **extra)
    )


async def chat_events(
    env: Envelope,
    deltas: AsyncGenerator[tuple[int, TokenDelta], None],
    n: int,
    prompt_tokens: int,
    include_usage: bool,
    top: int | None,
    extra: dict[str, Any],
    tools: ChatTools | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    for index in range(n):
        yield chat_chunk(
            env, index, {"role": "assistant", "content": ""}, include_usage=include_usage, **extra
        )
    splitters = [tools.stream() for _ in range(n)] if tools is not None else None
    usages: list[Usage] = []
    async for index, delta in deltas:
        logprobs = chat_logprobs(delta.logprobs, top) if top is not None and delta.logprobs else None
        finish_reason = delta.finish_reason
        text = delta.text
        if splitters is not None:
            text, calls, finish_reason = splitters[index].split(delta)
            if calls and (text or logprobs):  # the content before the calls goes first
                yield chat_chunk(env, index, {"content": text} if text else {}, None, logprobs, include_usage)
                text, logprobs = "", None
            for piece in calls:
                yield chat_chunk(env, index, piece, include_usage=include_usage)
        if text or logprobs or finish_reason is not None:
            content = {"content": text} if text else {}
            yield chat_chunk(env, index, content, finish_reason, logprobs, include_usage)
        if delta.usage is not None:
            usages.append(delta.usage)
    if include_usage:
        yield usage_chunk(env, request_usage(prompt_tokens, usages))


@router.post("/completions", response_model=None, openapi_extra=json_body(CompletionRequest))
async def completions(request: Request, state: State) -> Response:
    req: CompletionRequest = CompletionRequest.parse(parse_json_object(await request.body()))
    info = state.engine.model_info
    call = CompletionCall("openai.completions", req.prompt, req.sampling(state.config.sampling, info), req.n)
    generation = await state.chat.complete(call, http_caller(request))
    echoes = [text if req.echo else "" for text in req.prompt for _ in range(req.n)]
    logprobs = req.logprobs is not None
    env = Envelope.new("cmpl", "text_completion", info.name)
    if req.stream:
        deltas, prompt_tokens = generation.deltas(), generation.prompt_tokens
        return sse_response(
            completion_events(env, deltas, echoes, prompt_tokens, req.include_usage(), logprobs)
        )
    choices = await generation.collect()
    if choices is None:
        return Response(status_code=499)
    usage = choices_usage(generation.prompt_tokens, choices)
    for out, echo in zip(choices, echoes, strict=True):
        out.text = echo + out.text
    return JSONResponse(completion(env, choices, usage, logprobs, [len(e) for e in echoes]))


async def completion_events(
    env: Envelope,
    deltas: AsyncGenerator[tuple[int, TokenDelta], None],
    echoes: list[str],
    prompt_tokens: int,
    include_usage: bool,
    logprobs: bool,
) -> AsyncGenerator[dict[str, Any], None]:
    for index, echo in enumerate(echoes):
        if echo:
            yield completion_chunk(env, index, echo, include_usage=include_usage)
    offsets = [len(e) for e in echoes]
    usages: list[Usage] = []
    async for index, delta in deltas:
        entries = delta.logprobs or []
        if delta.text or entries or delta.finish_reason is not None:
            lp = completion_logprobs(entries, offsets[index]) if logprobs else None
            offsets[index] += sum(len(e.token) for e in entries)
            yield completion_chunk(env, index, delta.text, delta.finish_reason, lp, include_usage)
        if delta.usage is not None:
            usages.append(delta.usage)
    if include_usage:
        yield usage_chunk(env, request_usage(prompt_tokens, usages))


@router.post("/embeddings", openapi_extra=json_body(EmbeddingRequest))
async def embeddings(request: Request, state: State) -> JSONResponse:
    req: EmbeddingRequest = EmbeddingRequest.parse(parse_json_object(await request.body()))
    shared = state.embedder

    def embed() -> dict[str, Any]:
        embedder = shared.get()  # loads the model on first use
        req.check_dimensions(embedder.dim)
        query = req.input_type == "query"
        vectors = embedder.embed_queries(req.input) if query else embedder.embed_passages(req.input)
        tokens = embedder.count_tokens(req.input, query=query)
        return embedding_list(vectors, embedder.name, req.encoding_format, tokens)

    return JSONResponse(await asyncio.to_thread(embed))


def choices_usage(prompt_tokens: int, choices: list[ChoiceOutput]) -> Usage:
    return request_usage(prompt_tokens, [Usage(0, c.completion_tokens, c.cached_tokens) for c in choices])
