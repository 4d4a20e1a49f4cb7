"""The chat service: conversation -> prompt ids -> engine stream. Shared by every front end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from easllm.chat.template import Conversation, PromptBuilder
from easllm.engine.base import Engine
from easllm.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, Usage
from easllm.errors import InvalidRequest, NotReady


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
    def __init__(self, engine: Engine, max_round: int, no_template: bool = False) -> None:
        self.engine = engine
        self.max_round = max_round
        self.no_template = no_template
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
        knowledge base and the chunks used come back as `sources`."""
        if use_knowledge:
            raise InvalidRequest("this service has no knowledge base (langchain) yet", "langchain")
        built = self.prompts.build(
            conv,
            max_round=self.max_round if max_round is None else max_round,
            max_new_tokens=sampling.max_new_tokens,
            no_template=no_template,
        )
        request = GenerationRequest(built.token_ids, replace(sampling, max_new_tokens=built.max_new_tokens))
        return PreparedRound(request)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenDelta]:
        async with aclosing(self.engine.generate(req)) as deltas:
            async for delta in deltas:
                yield delta


async def collect(deltas: AsyncIterator[TokenDelta]) -> Answer:
    parts: list[str] = []
    async with aclosing(deltas) as stream:  # type: ignore[type-var]
        async for delta in stream:
            parts.append(delta.text)
            if delta.finish_reason is not None:
                assert delta.usage is not None
                return Answer("".join(parts), delta.finish_reason, delta.usage)
    raise RuntimeError("the engine stream ended without a finish reason")
