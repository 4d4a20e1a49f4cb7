"""Tool calling on chat messages: one object for prompt, grammar and replies.

`ChatTools` joins the request's `ToolSession` (easllm/tools) with the OpenAI reply shapes
(protocol/openai_tools.py): it constrains the sampling, renders the prompt with the tools, turns a
finished choice into calls, and splits a stream into content chunks and tool-call chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from easllm.chat.template import ChatTemplate, Message, PromptBuilder
from easllm.engine.types import FinishReason, GenerationRequest, ModelInfo, SamplingParams, TokenDelta
from easllm.errors import InvalidRequest
from easllm.protocol.openai_replies import ChoiceOutput
from easllm.protocol.openai_tools import tool_call_deltas
from easllm.tools.formats import format_for_template
from easllm.tools.session import ToolSession, ToolStream, renders_tools, tool_session
from easllm.tools.types import ToolRequest


class ChatTools:
    def __init__(self, session: ToolSession, legacy: bool) -> None:
        self.session = session
        self.legacy = legacy  # the request used `functions`: replies say `function_call`
        self.finish_reason = FinishReason.FUNCTION_CALL if legacy else FinishReason.TOOL_CALLS

    def constrain(self, sampling: SamplingParams) -> SamplingParams:
        if self.session.grammar is None:
            return sampling
        if sampling.grammar is not None:
            raise InvalidRequest("response_format cannot be combined with tools", "response_format")
        return replace(sampling, grammar=self.session.grammar, grammar_triggers=self.session.grammar_triggers)

    def settle(self, out: ChoiceOutput) -> None:
        """A finished choice: its text becomes content + calls when it holds valid calls."""
        if out.finish_reason is not FinishReason.STOP:
            return  # cut off (length, abort): a call in it is incomplete
        answer = self.session.answer(out.text)
        if answer.calls:
            out.text = answer.content or ""
            out.tool_calls = answer.calls
            out.finish_reason = self.finish_reason

    def stream(self) -> ChoiceSplitter:
        return ChoiceSplitter(self, self.session.stream())


class ChoiceSplitter:
    """One streamed choice: content passes on, a call is held and sent as tool-call chunks."""

    def __init__(self, tools: ChatTools, stream: ToolStream) -> None:
        self._tools = tools
        self._stream = stream

    def split(self, delta: TokenDelta) -> tuple[str, list[dict[str, Any]], FinishReason | None]:
        """(content to send now, tool-call deltas to send first, the finish reason to report)."""
        text = self._stream.feed(delta.text)
        if delta.finish_reason is None:
            return text, [], None
        held = self._stream.held
        answer = self._stream.finish()
        if not answer.calls or delta.finish_reason is not FinishReason.STOP:
            return text + held, [], delta.finish_reason  # no valid call: the held text is content
        return text, tool_call_deltas(answer.calls, self._tools.legacy), self._tools.finish_reason


def chat_tools(
    request: ToolRequest | None,
    template: ChatTemplate | None,
    info: ModelInfo,
    parser: str | None,
    legacy: bool,
) -> ChatTools | None:
    if request is None:
        return None
    session = tool_session(request, template, info.features, info.engine, parser)
    return None if session is None else ChatTools(session, legacy)


def tool_prompt(
    prompts: PromptBuilder, messages: Sequence[Message], tools: ChatTools, sampling: SamplingParams
) -> GenerationRequest:
    """The prompt with the tools shown; a tools section that leaves no room is a 400 naming `tools`."""
    ids = prompts.encode_messages(messages, tools=tools.session.template_tools())
    try:
        built = prompts.fit(ids, sampling.max_new_tokens, "messages")
    except InvalidRequest as exc:
        context = prompts.context_length
        without = len(prompts.encode_messages(messages))
        raise InvalidRequest(
            f"the prompt with the tools is {len(ids)} tokens ({len(ids) - without} for the tools); "
            f"the model's context is {context}",
            "tools" if without < context else "messages",
        ) from exc
    return GenerationRequest(ids, replace(sampling, max_new_tokens=built.max_new_tokens))


def tool_card(
    card: dict[str, Any], template: ChatTemplate | None, info: ModelInfo, parser: str | None
) -> dict[str, Any]:
    """What `/v1/models` adds about tools: `tools` (auto) and `tool_choice_required` (required and
    named, by grammar) in `features`, and the call format in `tool_call_parser`."""
    if template is None or not renders_tools(template):
        return {"tool_call_parser": None}
    name = parser or format_for_template(template.source)
    features = set(card["features"])
    if name is not None:
        features.add("tools")
        if "grammar" in info.features:
            features.add("tool_choice_required")
    return {"features": sorted(features), "tool_call_parser": name}
