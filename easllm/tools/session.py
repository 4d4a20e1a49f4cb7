"""One request's tool calling: which format, which grammar, and generated text -> content + calls.

`tool_choice` `required` or a named function constrain the whole answer with a grammar built
from the tools' schemas (engines with `grammar`); `auto` constrains it from the moment the model
opens a call (a lazy grammar, engines with `grammar_triggers`), or else checks the call after
the fact. Either way a call that names no offered tool or whose arguments fail the schema is
never returned as a call: the answer is returned as text.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass, field

from easllm.chat.template import ChatTemplate
from easllm.errors import InvalidRequest
from easllm.tools.formats import FORMATS, MalformedCall, ToolFormat, format_for_template
from easllm.tools.grammar import tool_call_grammar
from easllm.tools.types import ChoiceMode, ToolCall, ToolRequest
from easllm.tools.validate import checked_calls

_PROBE = {
    "type": "function",
    "function": {"name": "easllm_probe_tool", "description": "", "parameters": {"type": "object"}},
}


@functools.cache
def renders_tools(template: ChatTemplate) -> bool:
    """Whether the template shows the tools to the model (it names a probe tool when given one)."""
    try:
        text = template.render([{"role": "user", "content": "hi"}], tools=[_PROBE])
    except InvalidRequest:
        return False
    return "easllm_probe_tool" in text


@dataclass(frozen=True)
class ToolAnswer:
    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


class ToolSession:
    def __init__(self, request: ToolRequest, fmt: ToolFormat, grammar: str | None, lazy: bool) -> None:
        self.request = request
        self.format = fmt
        self.grammar = grammar
        self.grammar_triggers: tuple[str, ...] = (fmt.trigger,) if lazy and fmt.trigger else ()

    def template_tools(self) -> list[dict[str, object]]:
        return [t.as_template_dict() for t in self.request.tools]

    def answer(self, text: str) -> ToolAnswer:
        """The whole generated text as content and calls; as text only when it holds no valid call."""
        try:
            parsed = self.format.parse(text)
        except MalformedCall:
            return ToolAnswer(text)
        if parsed is None or not parsed.calls:
            return ToolAnswer(text)
        raw = parsed.calls if self.request.parallel else parsed.calls[:1]
        calls = checked_calls(raw, self.request.callable_tools, self.format.new_id)
        if calls is None:
            return ToolAnswer(text)
        return ToolAnswer(parsed.content.strip() or None, calls)

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """Splits streamed text into content, sent on at once, and a call, held until the answer ends."""

    def __init__(self, session: ToolSession) -> None:
        self._session = session
        self._held = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        """The content that may go to the client now."""
        if self._in_call:
            self._held += text
            return ""
        text = self._held + text
        fmt = self._session.format
        at = fmt.opens_call(text)
        if at is not None:
            self._in_call = True
            self._held = text[at:]
            return text[:at]
        keep = fmt.may_open_call(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    @property
    def held(self) -> str:
        """Text not yet sent on: a possible call, or its start."""
        return self._held

    def finish(self) -> ToolAnswer:
        """What is left at the end: held text as content, or the calls."""
        held, self._held = self._held, ""
        if not self._in_call:
            return ToolAnswer(held or None)
        answer = self._session.answer(held)
        return ToolAnswer(answer.content, answer.calls) if answer.calls else ToolAnswer(held)


def tool_session(
    request: ToolRequest,
    template: ChatTemplate | None,
    features: Collection[str],
    engine: str,
    parser: str | None = None,
) -> ToolSession | None:
    """The session for a request's tools; None under `tool_choice: none` (the prompt then shows no
    tools). InvalidRequest when the model or engine cannot do what the request asks."""
    mode = request.choice.mode
    if mode is ChoiceMode.NONE:
        return None
    if template is None or not renders_tools(template):
        raise InvalidRequest("this model's chat template does not support tools", "tools")
    name = parser or format_for_template(template.source)
    if name is None:
        raise InvalidRequest(
            "the chat template renders tools in a call format easllm does not know: start the "
            f"service with --tool-call-parser ({', '.join(FORMATS)})",
            "tools",
        )
    fmt = FORMATS[name]()
    if mode in (ChoiceMode.REQUIRED, ChoiceMode.NAMED):
        if "grammar" not in features:
            raise InvalidRequest(
                f"tool_choice {mode.value} needs grammar-constrained decoding, which the {engine} "
                "engine lacks: use auto",
                "tool_choice",
            )
        grammar = tool_call_grammar(fmt, request.callable_tools, request.parallel)
        return ToolSession(request, fmt, grammar, lazy=False)
    if "grammar_triggers" in features and fmt.trigger:
        grammar = tool_call_grammar(fmt, request.tools, request.parallel)
        return ToolSession(request, fmt, grammar, lazy=True)
    return ToolSession(request, fmt, None, lazy=False)
