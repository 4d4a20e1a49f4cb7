"""Prompts: a conversation, chat messages or a completion text -> one fitted GenerationRequest,
grounded on the knowledge base when asked. Blocking (tokenizing, the knowledge-base search):
the serving layer runs these in a worker thread.

Fitting is `PromptBuilder.fit` (chat/template.py) for every front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from easllm.chat.template import BuiltPrompt, Conversation, Message, PromptBuilder
from easllm.engine.base import Engine
from easllm.engine.types import GenerationRequest, SamplingParams
from easllm.errors import InvalidRequest, NotReady
from easllm.export.record import conversation_from_messages
from easllm.rag.grounding import grounded_completion, grounded_system
from easllm.serving.tools import ChatTools, tool_prompt

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
class Prepared:
    """One prompt ready for the engine, with what the history export records of it."""

    request: GenerationRequest
    conversation: Conversation
    sources: list[Source] = field(default_factory=list)


class Prompts:
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
        self._builder: PromptBuilder | None = None

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            if not self.engine.health().ready:
                raise NotReady("the model is still loading")
            self._builder = PromptBuilder(self.engine.model_info, self.engine.tokenize, self.no_template)
        return self._builder

    def retrieve(self, question: str) -> list[Hit]:
        """The knowledge-base chunks for a question (top-k, score threshold)."""
        kb = self.knowledge
        if kb is None or kb.is_empty():
            raise InvalidRequest(
                "the knowledge base is empty: upload files (POST /v1/knowledge/files) before asking "
                "with langchain",
                "langchain",
            )
        return kb.context(question)

    def conversation(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None = None,
        max_round: int | None = None,
        use_knowledge: bool = False,
    ) -> Prepared:
        """With `use_knowledge` (the EAS `langchain` flag) grounded on the knowledge base, the
        chunks used in `sources`."""
        rounds = self.max_round if max_round is None else max_round
        if use_knowledge:
            return self._grounded(conv, sampling, no_template, rounds, self.retrieve(conv.prompt))
        built = self.builder.build(
            conv, max_round=rounds, max_new_tokens=sampling.max_new_tokens, no_template=no_template
        )
        return Prepared(_request(built, sampling), conv)

    def messages(
        self,
        messages: list[Message],
        sampling: SamplingParams,
        use_knowledge: bool = False,
        tools: ChatTools | None = None,
    ) -> Prepared:
        """Chat messages as the model's template renders them (with the tools, when offered)."""
        if tools is not None:
            sources: list[Source] = []
            if use_knowledge:
                messages, sources = self._ground_messages(messages)
            request = tool_prompt(self.builder, messages, tools, sampling)
            return Prepared(request, conversation_from_messages(messages), sources)
        if use_knowledge:
            conv = alternating_conversation(messages)
            return self.conversation(conv, sampling, False, len(conv.history), use_knowledge=True)
        builder = self.builder
        built = builder.fit(builder.encode_messages(messages), sampling.max_new_tokens, "messages")
        return Prepared(_request(built, sampling), conversation_from_messages(messages))

    def completion(self, text: str, sampling: SamplingParams) -> Prepared:
        builder = self.builder
        built = builder.fit(builder.encode_raw(text), sampling.max_new_tokens, "prompt")
        return Prepared(_request(built, sampling), Conversation(text))

    def _ground_messages(self, messages: list[Message]) -> tuple[list[Message], list[Source]]:
        """The knowledge base's excerpts for the last user message in the system part, for prompts
        that also carry tools (the template shows the tools after the system)."""
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not question.strip():
            raise InvalidRequest("with the knowledge base, messages need a user message", "messages")
        hits = self.retrieve(question)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rest = [m for m in messages if m["role"] != "system"]
        grounded: Message = {
            "role": "system",
            "content": grounded_system(system, hits, question, with_tools=True),
        }
        return [grounded, *rest], _sources(hits)

    def _grounded(
        self,
        conv: Conversation,
        sampling: SamplingParams,
        no_template: bool | None,
        max_round: int,
        hits: list[Hit],
    ) -> Prepared:
        """The excerpts in the system part, the question as asked; the lowest-scoring excerpts go
        first when the context is short."""
        builder = self.builder
        raw = builder.no_template_default if no_template is None else no_template or builder.template is None
        room = min(sampling.max_new_tokens, RAG_ANSWER_ROOM)
        for n in range(len(hits), 0, -1) if hits else [0]:
            used = hits[:n]
            if raw:
                grounded = Conversation(grounded_completion(conv.prompt, used, conv.system_prompt))
            else:
                grounded = replace(conv, system_prompt=grounded_system(conv.system_prompt, used, conv.prompt))
            try:
                built = builder.build(
                    grounded, max_round=max_round, max_new_tokens=sampling.max_new_tokens, no_template=raw
                )
            except InvalidRequest:
                if n > 1:
                    continue
                raise
            if not hits or len(built.token_ids) + room <= builder.context_length:
                return Prepared(_request(built, sampling), conv, _sources(used))
        raise InvalidRequest(
            f"the question and one knowledge-base excerpt leave no room for an answer in the model's "
            f"context ({builder.context_length} tokens): ask a shorter question or lower --kb-chunk-size",
            "prompt",
        )


def alternating_conversation(messages: list[Message]) -> Conversation:
    """Messages as system prompt + rounds + prompt, the shape the knowledge base answers."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in rest]
    if len(rest) % 2 == 0 or roles != ["user", "assistant"] * (len(rest) // 2) + ["user"]:
        raise InvalidRequest(
            "with the knowledge base, messages must alternate user/assistant and end with a user message",
            "messages",
        )
    rounds = tuple((rest[i]["content"], rest[i + 1]["content"]) for i in range(0, len(rest) - 1, 2))
    return Conversation(rest[-1]["content"], system, rounds)


def _sources(hits: list[Hit]) -> list[Source]:
    return [
        Source(h.chunk.source, h.chunk.content, round(h.score, 4), h.chunk.page, h.chunk.heading)
        for h in hits
    ]


def _request(built: BuiltPrompt, sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest(built.token_ids, replace(sampling, max_new_tokens=built.max_new_tokens))
