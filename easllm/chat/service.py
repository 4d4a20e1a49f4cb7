"""The chat service: conversation -> prompt ids -> engine stream. Shared by every front end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from easllm.chat.template import BuiltPrompt, Conversation, Message, PromptBuilder
from easllm.engine.base import Engine
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, Usage
from easllm.errors import InvalidRequest, NotReady
from easllm.rag.grounding import grounded_completion, grounded_question, grounded_system

if TYPE_CHECKING:
    from easllm.rag.knowledge import KnowledgeBase
    from easllm.rag.store import Hit

# A grounded prompt drops excerpts until this much room is left for the answer.
RAG_ANSWER_ROOM = 256


@dataclass(frozen=True)
class Source:
    """A knowledge-base chunk a RAG answer was grounded on."""

    source: str  # file name
    content: str  # chunk text
    score: float
    page: int | None = None
    heading: str | None = None


@dataclass
class PreparedRound:
    request: GenerationRequest
    sources: list[Source] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    finish_reason: FinishReason
    usage: Usage


class ChatService:
    def __init__(
        self,
        engine: Engine,
        max_round: int,
        no_template: bool = False,
        knowledge: KnowledgeBase | None = None,
    ) -> None:
        self.engine = engine
        self.max_round = max_round
        self.no_template = no_template
        self.knowledge = knowledge
        self._prompts: PromptBuilder | None = None

    @property
    def prompts(self) -> PromptBuilder:
        if self._prompts is None:
            if not self.engine.health().ready:
                raise NotReady("the model is still loading")
            self._prompts = PromptBuilder(self.engine.model_info, self.engine.tokenize, self.no_template)
        return self._prompts

    def prepare(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None = None,
        max_round: int | None = None,
        use_knowledge: bool = False,
    ) -> PreparedRound:
        """Build the prompt now, so a bad request fails before any answer starts.

        With `use_knowledge` (the EAS `langchain` flag) the answer is grounded on the service's
        knowledge base and the chunks used come back as `sources`. The search embeds the question
        (~0.1 s of CPU): async callers use `prepare_async`, which runs it in a worker thread."""
        hits = self.retrieve(conv.prompt) if use_knowledge else None
        return self._prepare(conv, sampling, no_template, max_round, hits)

    async def prepare_async(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None = None,
        max_round: int | None = None,
        use_knowledge: bool = False,
    ) -> PreparedRound:
        """`prepare` off the event loop: the knowledge-base search and tokenizing a long prompt
        would otherwise stall every other request."""
        return await asyncio.to_thread(self.prepare, conv, sampling, no_template, max_round, use_knowledge)

    def retrieve(self, question: str) -> list[Hit]:
        """The knowledge-base chunks for a question (top-k, score threshold); blocking."""
        kb = self.knowledge
        if kb is None or kb.is_empty():
            raise InvalidRequest(
                "the knowledge base is empty: upload files (POST /v1/knowledge/files) before asking "
                "with langchain",
                "langchain",
            )
        return kb.context(question)

    async def ground_messages(self, messages: list[Message]) -> tuple[list[Message], list[Source]]:
        """The messages with the knowledge base's excerpts for the last user message in the system
        part, for prompts that also carry tools (the template shows the tools after the system)."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise InvalidRequest("with the knowledge base, messages need a user message", "messages")
        hits = await asyncio.to_thread(self.retrieve, question)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rest = [m for m in messages if m["role"] != "system"]
        grounded: Message = {"role": "system", "content": grounded_system(system, hits)}
        return [grounded, *rest], _sources(hits)

    def _prepare(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None,
        max_round: int | None,
        hits: list[Hit] | None,
    ) -> PreparedRound:
        rounds = self.max_round if max_round is None else max_round
        if hits is not None:
            return self._prepare_grounded(conv, sampling, no_template, rounds, hits)
        built = self.prompts.build(
            conv, max_round=rounds, max_new_tokens=sampling.max_new_tokens, no_template=no_template
        )
        return PreparedRound(_request(built, sampling))

    def _prepare_grounded(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None,
        max_round: int,
        hits: list[Hit],
    ) -> PreparedRound:
        """Excerpts with the question; the lowest-scoring excerpts go first when the context is short."""
        prompts = self.prompts
        raw = prompts.no_template_default if no_template is None else no_template or prompts.template is None
        room = min(sampling.max_new_tokens, RAG_ANSWER_ROOM)
        for n in range(len(hits), 0, -1) if hits else [0]:
            used = hits[:n]
            if raw:
                grounded = Conversation(grounded_completion(conv.prompt, used, conv.system_prompt))
            else:
                grounded = replace(conv, prompt=grounded_question(conv.prompt, used))
            try:
                built = prompts.build(
                    grounded, max_round=max_round, max_new_tokens=sampling.max_new_tokens, no_template=raw
                )
            except InvalidRequest:
                if n > 1:
                    continue
                raise
            if not hits or len(built.token_ids) + room <= prompts.context_length:
                return PreparedRound(_request(built, sampling), _sources(used))
        raise InvalidRequest(
            f"the question and one knowledge-base excerpt leave no room for an answer in the model's "
            f"context ({prompts.context_length} tokens): ask a shorter question or lower --kb-chunk-size",
            "prompt",
        )

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        async with aclosing(self.engine.generate(req)) as deltas:
            async for delta in deltas:
                yield delta


def _sources(hits: list[Hit]) -> list[Source]:
    return [
        Source(h.chunk.source, h.chunk.content, round(h.score, 4), h.chunk.page, h.chunk.heading)
        for h in hits
    ]


def _request(built: BuiltPrompt, sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest(built.token_ids, replace(sampling, max_new_tokens=built.max_new_tokens))


async def collect(deltas: AsyncIterator[TokenDelta]) -> Answer:
    parts: list[str] = []
    async with aclosing(deltas) as stream:  # type: ignore[type-var]
        async for delta in stream:
            parts.append(delta.text)
            if delta.finish_reason is not None:
                assert delta.usage is not None
                return Answer("".join(parts), delta.finish_reason, delta.usage)
    raise RuntimeError("the engine stream ended without a finish reason")
