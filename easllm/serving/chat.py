"""The serving layer's entry points: one call per front end, transport-neutral.

    generation = await state.chat.converse(Turn("eas", conv, sampling), caller)    # EAS, WebSocket, WebUI
    generation = await state.chat.chat(ChatCall("openai.chat", messages, sampling, n=2), caller)
    generation = await state.chat.complete(CompletionCall("openai.completions", prompts, sampling), caller)

Each builds and fits the prompt (grounded on the knowledge base when asked) in a worker thread,
fans out `n` choices, observes each (metrics, history export, access-log tokens) and starts the
first stream; the front end writes `generation.deltas()` or `await generation.collect()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from easllm.chat.template import Conversation, Message
from easllm.engine.base import Engine
from easllm.engine.types import GenerationRequest, SamplingParams, TokenDelta
from easllm.protocol.openai import choice_samplings
from easllm.serving.caller import Caller
from easllm.serving.choices import Generation, first_then_rest
from easllm.serving.observe import RoundObserver
from easllm.serving.prompts import Prepared, Prompts
from easllm.serving.tools import ChatTools, chat_tools, tool_card
from easllm.tools.types import ToolRequest

if TYPE_CHECKING:
    from easllm.rag.knowledge import KnowledgeBase


@dataclass(frozen=True)
class Turn:
    """One round of a conversation: the EAS API, its stream, the WebSocket and the WebUI."""

    api: str  # the label of metrics and history records
    conversation: Conversation
    sampling: SamplingParams
    no_template: bool | None = None
    use_knowledge: bool = False  # ground the answer on the knowledge base (EAS `langchain`)


@dataclass(frozen=True)
class ChatCall:
    """Chat messages with `n` choices, tools and the knowledge base (OpenAI chat completions)."""

    api: str
    messages: list[Message]
    sampling: SamplingParams
    n: int = 1
    use_knowledge: bool = False
    tools: ToolRequest | None = None
    legacy_functions: bool = False  # the tools came as `functions`: replies say `function_call`


@dataclass(frozen=True)
class CompletionCall:
    """Raw prompts, each with `n` choices (OpenAI completions)."""

    api: str
    prompts: list[str]
    sampling: SamplingParams
    n: int = 1


class ChatServing:
    def __init__(
        self,
        engine: Engine,
        max_round: int,
        no_template: bool = False,
        knowledge: KnowledgeBase | None = None,
        observer: RoundObserver | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.engine = engine
        self.prompts = Prompts(engine, max_round, no_template, knowledge)
        self.observer = observer  # None: nothing is measured or recorded (tests)
        self.tool_call_parser = tool_call_parser

    @property
    def knowledge(self) -> KnowledgeBase | None:
        return self.prompts.knowledge

    async def converse(self, turn: Turn, caller: Caller | None = None, *, start: bool = True) -> Generation:
        """One answer to the conversation's prompt. `start=False` leaves the first stream unstarted
        (the WebUI shows the question while the prompt is computed)."""
        prepared = await asyncio.to_thread(
            self.prompts.conversation,
            turn.conversation,
            turn.sampling,
            turn.no_template,
            use_knowledge=turn.use_knowledge,
        )
        return await self._generate(turn.api, [prepared], 1, caller or Caller(), start)

    async def chat(self, call: ChatCall, caller: Caller | None = None) -> Generation:
        tools = self.chat_tools(call.tools, call.legacy_functions)
        sampling = call.sampling if tools is None else tools.constrain(call.sampling)
        prepared = await asyncio.to_thread(
            self.prompts.messages, call.messages, sampling, call.use_knowledge, tools
        )
        generation = await self._generate(call.api, [prepared], call.n, caller or Caller())
        generation.tools = tools
        return generation

    async def complete(self, call: CompletionCall, caller: Caller | None = None) -> Generation:
        prompts = self.prompts
        prepared = await asyncio.to_thread(
            lambda: [prompts.completion(t, call.sampling) for t in call.prompts]
        )
        return await self._generate(call.api, prepared, call.n, caller or Caller())

    def chat_tools(self, request: ToolRequest | None, legacy: bool) -> ChatTools | None:
        builder = self.prompts.builder
        return chat_tools(request, builder.template, self.engine.model_info, self.tool_call_parser, legacy)

    def tool_card(self, card: dict[str, Any]) -> dict[str, Any]:
        """What `/v1/models` says about tools for this model."""
        template = self.prompts.builder.template
        return tool_card(card, template, self.engine.model_info, self.tool_call_parser)

    async def _generate(
        self, api: str, prepared: list[Prepared], n: int, caller: Caller, start: bool = True
    ) -> Generation:
        streams: list[AsyncGenerator[TokenDelta, None]] = []
        for p in prepared:
            for sampling in choice_samplings(p.request.sampling, n):
                request = GenerationRequest(p.request.prompt_token_ids, sampling)
                deltas = self.engine.generate(request)
                if self.observer is not None:
                    deltas = self.observer.watch(
                        deltas, api, caller, p.conversation, request, p.sources, len(streams)
                    )
                streams.append(deltas)
        if start:
            streams[0] = await first_then_rest(streams[0])
        prompt_tokens = sum(len(p.request.prompt_token_ids) for p in prepared)
        return Generation(streams, prompt_tokens, [s for p in prepared for s in p.sources], caller=caller)
