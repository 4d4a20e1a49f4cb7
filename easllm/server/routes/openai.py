"""`/v1`: the OpenAI API — models, chat completions, completions (SSE streaming), embeddings.

Requests become the same `GenerationRequest`s as the EAS API's and go to the same engine;
`n` choices (and several completion prompts) are separate requests merged into one reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import asdict, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from easllm.chat.service import ChatService
from easllm.engine.types import GenerationRequest, SamplingParams, TokenDelta, Usage
from easllm.errors import InvalidRequest
from easllm.history.record import conversation_from_messages
from easllm.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    choice_samplings,
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
from easllm.server.sse import merge_choices, sse_response
from easllm.server.streaming import first_then_rest
from easllm.server.tool_calls import ChatTools, chat_tools, tool_card, tool_prompt

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
T = TypeVar("T")


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [served_model_card(request)]})


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    info = request.app.state.engine.model_info
    if model_id != info.name:
        raise HTTPException(404, f"model {model_id!r} is not served here; this service serves {info.name!r}")
    return JSONResponse(served_model_card(request))


def served_model_card(request: Request) -> dict[str, Any]:
    state = request.app.state
    info = state.engine.model_info
    card = model_card(info, int(time.time()))
    card.update(tool_card(card, state.chat.prompts.template, info, state.config.tool_call_parser))
    return card


@router.post("/chat/completions", response_model=None, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    state = request.app.state
    req: ChatCompletionRequest = ChatCompletionRequest.parse(parse_json_object(await request.body()))
    service: ChatService = state.chat
    info = state.engine.model_info
    sampling = req.sampling(state.config.sampling, info)
    extra: dict[str, Any] = {}
    tools = req.tool_request()
    session = chat_tools(
        tools, service.prompts.template, info, state.config.tool_call_parser, req.legacy_functions
    )
    if session is not None:
        sampling = session.constrain(sampling)
        messages = req.messages_native()
        if req.use_knowledge:
            messages, sources = await service.ground_messages(messages)
            extra["sources"] = [asdict(s) for s in sources]
        base = await asyncio.to_thread(tool_prompt, service.prompts, messages, session, sampling, info)
        conv = conversation_from_messages(messages)
    elif req.use_knowledge:
        conv = req.conversation()
        prepared = await service.prepare_async(
            conv, sampling, no_template=False, max_round=len(conv.history), use_knowledge=True
        )
        base = prepared.request
        extra["sources"] = [asdict(s) for s in prepared.sources]
    else:
        prompts = service.prompts  # tokenizing a long prompt would stall the event loop: a thread does it
        messages = req.messages_native()
        ids = await asyncio.to_thread(prompts.encode_messages, messages)
        base = fit(ids, sampling, info.context_length, "messages")
        conv = conversation_from_messages(messages)
    gens = [GenerationRequest(base.prompt_token_ids, s) for s in choice_samplings(base.sampling, req.n)]
    sources = extra.get("sources", ())
    streams = [
        state.rounds.watch(service.stream(g), "openai.chat", request, conv, g, sources, choice=i)
        for i, g in enumerate(gens)
    ]
    top = (req.top_logprobs or 0) if req.logprobs else None
    prompt_tokens = len(base.prompt_token_ids)
    env = Envelope.new("chatcmpl", "chat.completion", info.name)
    if req.stream:
        deltas = merge_choices(await start_streams(streams))
        chunks = replace(env, object="chat.completion.chunk")
        return sse_response(
            chat_events(chunks, deltas, len(gens), prompt_tokens, req.include_usage(), top, extra, session)
        )
    outputs = await unless_disconnected(collect_choices(streams), request)
    if outputs is None:
        return Response(status_code=499)
    if session is not None:
        for out in outputs:
            session.settle(out)
    usage = request_usage(prompt_tokens, [Usage(0, c.completion_tokens, c.cached_tokens) for c in outputs])
    return JSONResponse(chat_completion(env, outputs, usage, top, **extra))


async def chat_events(
    env: Envelope,
    deltas: AsyncIterator[tuple[int, TokenDelta]],
    n: int,
    prompt_tokens: int,
    include_usage: bool,
    top: int | None,
    extra: dict[str, Any],
    session: ChatTools | None = None,
) -> AsyncIterator[dict[str, Any]]:
    for index in range(n):
        yield chat_chunk(
            env, index, {"role": "assistant", "content": ""}, include_usage=include_usage, **extra
        )
    splitters = [session.stream() for _ in range(n)] if session is not None else None
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
async def completions(request: Request) -> Response:
    state = request.app.state
    req: CompletionRequest = CompletionRequest.parse(parse_json_object(await request.body()))
    service: ChatService = state.chat
    info = state.engine.model_info
    sampling = req.sampling(state.config.sampling, info)
    gens: list[GenerationRequest] = []
    echoes: list[str] = []
    texts: list[str] = []  # the prompt of each choice, for the history
    prompt_tokens = 0
    prompts = service.prompts
    encoded = await asyncio.to_thread(lambda: [prompts.encode_raw(text) for text in req.prompt])
    for text, ids in zip(req.prompt, encoded, strict=True):
        base = fit(ids, sampling, info.context_length, "prompt")
        prompt_tokens += len(base.prompt_token_ids)
        for choice_sampling in choice_samplings(base.sampling, req.n):
            gens.append(GenerationRequest(base.prompt_token_ids, choice_sampling))
            echoes.append(text if req.echo else "")
            texts.append(text)
    logprobs = req.logprobs is not None
    streams = [
        state.rounds.watch(service.stream(g), "openai.completions", request, text, g, choice=i)
        for i, (g, text) in enumerate(zip(gens, texts, strict=True))
    ]
    env = Envelope.new("cmpl", "text_completion", info.name)
    if req.stream:
        deltas = merge_choices(await start_streams(streams))
        return sse_response(
            completion_events(env, deltas, echoes, prompt_tokens, req.include_usage(), logprobs)
        )
    outputs = await unless_disconnected(collect_choices(streams), request)
    if outputs is None:
        return Response(status_code=499)
    usage = request_usage(prompt_tokens, [Usage(0, c.completion_tokens, c.cached_tokens) for c in outputs])
    for out, echo in zip(outputs, echoes, strict=True):
        out.text = echo + out.text
    return JSONResponse(completion(env, outputs, usage, logprobs, [len(e) for e in echoes]))


async def completion_events(
    env: Envelope,
    deltas: AsyncIterator[tuple[int, TokenDelta]],
    echoes: list[str],
    prompt_tokens: int,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[dict[str, Any]]:
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
async def embeddings(request: Request) -> JSONResponse:
    req: EmbeddingRequest = EmbeddingRequest.parse(parse_json_object(await request.body()))
    shared = request.app.state.embedder

    def embed() -> dict[str, Any]:
        embedder = shared.get()  # loads the model on first use
        req.check_dimensions(embedder.dim)
        query = req.input_type == "query"
        vectors = embedder.embed_queries(req.input) if query else embedder.embed_passages(req.input)
        tokens = embedder.count_tokens(req.input, query=query)
        return embedding_list(vectors, embedder.name, req.encoding_format, tokens)

    return JSONResponse(await asyncio.to_thread(embed))


# -- shared by the routes above --


def fit(ids: list[int], sampling: SamplingParams, context_length: int, param: str) -> GenerationRequest:
    """The request, its max_new_tokens capped at what the context leaves after the prompt."""
    room = context_length - len(ids)
    if room < 1:
        raise InvalidRequest(
            f"the prompt is {len(ids)} tokens; the model's context is {context_length}", param
        )
    return GenerationRequest(ids, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room)))


async def start_streams(streams: Sequence[AsyncIterator[TokenDelta]]) -> list[AsyncIterator[TokenDelta]]:
    """The first stream is started now, so a full queue is a 503 rather than a broken 200 stream."""
    first = await first_then_rest(streams[0])
    return [first, *streams[1:]]


async def collect_choices(streams: Sequence[AsyncIterator[TokenDelta]]) -> list[ChoiceOutput]:
    outputs = [ChoiceOutput(i) for i in range(len(streams))]
    async for index, delta in merge_choices(streams):
        out = outputs[index]
        out.text += delta.text
        out.logprobs.extend(delta.logprobs or [])
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.completion_tokens = delta.usage.completion_tokens if delta.usage else 0
            out.cached_tokens = delta.usage.cached_tokens if delta.usage else 0
    return outputs


async def unless_disconnected(work: Awaitable[T], request: Request, poll: float = 0.2) -> T | None:
    """The result, or None when the client goes away first (the work is cancelled: generation aborts)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client went away; generation aborted")
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
