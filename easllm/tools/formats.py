"""The models' tool-call syntaxes: parse generated text into calls, and the grammar that forces one.

One class per format, named as vLLM's `--tool-call-parser` names them:
- `hermes` (Qwen2.5, Hermes, ...): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- `llama3_json` (Llama 3.1-3.3): the whole answer is `{"name": ..., "parameters": {...}}`
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (or `[TOOL_CALLS]name[ARGS]{...}`)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from easllm.tools.types import new_call_id

MAX_CALLS = 8  # calls one answer may hold when parallel calls are allowed (the grammar's bound)


@dataclass(frozen=True)
class RawCall:
    """A call as the model wrote it: not yet checked against the tools."""

    name: str
    arguments: Any


@dataclass(frozen=True)
class Parsed:
    content: str  # text before the first call
    calls: list[RawCall]


class MalformedCall(ValueError):
    """The text opens a call but the call does not parse."""


class ToolFormat:
    name: ClassVar[str]
    arguments_key: ClassVar[str] = "arguments"
    # Text that opens a call: streaming holds it back, the lazy grammar starts on it.
    trigger: ClassVar[str | None] = None

    def opens_call(self, text: str) -> int | None:
        """Where the first call starts in `text`, or None when it holds none (yet)."""
        if self.trigger is None:
            return None
        at = text.find(self.trigger)
        return None if at < 0 else at

    def may_open_call(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a call: streaming
        holds them back until the next text decides."""
        trigger = self.trigger or ""
        for size in range(min(len(trigger) - 1, len(text)), 0, -1):
            if trigger.startswith(text[-size:]):
                return size
        return 0

    def parse(self, text: str) -> Parsed | None:
        """The calls in a whole answer; None when it holds no call; MalformedCall when it opens one
        that does not parse."""
        at = self.opens_call(text)
        if at is None:
            return None
        return Parsed(text[:at], self._parse_calls(text[at:]))

    def _parse_calls(self, text: str) -> list[RawCall]:
        raise NotImplementedError

    def root_rule(self, call_rule: str, parallel: bool) -> str:
        """The GBNF `root` for an answer that is one call (or up to MAX_CALLS) of `call_rule`."""
        raise NotImplementedError

    def new_id(self) -> str:
        return new_call_id()

    def _raw_call(self, obj: Any) -> RawCall:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise MalformedCall("a call must be a JSON object with a string `name`")
        arguments = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise MalformedCall(f"the arguments are not JSON: {exc}") from exc
        return RawCall(obj["name"], arguments)


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedCall(f"the call is not JSON: {exc}") from exc


def _repeat(item: str, sep: str, parallel: bool) -> str:
    return f"{item} ({sep} {item}){{0,{MAX_CALLS - 1}}}" if parallel else item


class HermesFormat(ToolFormat):
    """Also takes a bare call object, alone or in a ```json fence, as llama.cpp's Hermes parser
    does: small models (the bundled Qwen2.5-Coder 0.5B) often write the call that way."""

    name = "hermes"
    trigger = "<tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
    _bare = re.compile(r'(?:```(?:json)?\s*)?\{\s*"name"\s*:')

    def opens_call(self, text: str) -> int | None:
        starts = [text.find(self.trigger)]
        bare = self._bare.search(text)
        starts.append(bare.start() if bare else -1)
        found = [s for s in starts if s >= 0]
        return min(found) if found else None

    def may_open_call(self, text: str) -> int:
        held = super().may_open_call(text)
        ticks = len(text) - len(text.rstrip("`"))  # the start of a fence, still growing
        for at in (text.rfind("```"), text.rfind("{"), len(text) - ticks if ticks else -1):
            if at >= 0 and len(text) - at > held and _may_become_bare_call(text[at:]):
                held = len(text) - at
        return held

    def _parse_calls(self, text: str) -> list[RawCall]:
        if not text.startswith(self.trigger):
            return self._parse_bare(text)
        calls = []
        end = 0
        for match in self._block.finditer(text):
            if text[end : match.start()].strip():
                raise MalformedCall("text between calls")
            calls.append(self._raw_call(_load(match.group(1).strip())))
            end = match.end()
        return calls

    def _parse_bare(self, text: str) -> list[RawCall]:
        body = text.strip()
        if body.startswith("```"):
            body = body.removeprefix("```").removeprefix("json").removesuffix("```").strip()
        decoder = json.JSONDecoder()
        calls = []
        while body:
            try:
                obj, end = decoder.raw_decode(body)
            except json.JSONDecodeError as exc:
                raise MalformedCall(f"the call is not JSON: {exc}") from exc
            calls.append(self._raw_call(obj))
            body = body[end:].strip()
        return calls

    def root_rule(self, call_rule: str, parallel: bool) -> str:
        block = f'"<tool_call>" space {call_rule} "</tool_call>"'
        return _repeat(f"( {block} )", "space", parallel)


def _may_become_bare_call(text: str) -> bool:
    """Whether `text` (from a ``` or a {) may still grow into the start of a bare call object."""
    rest = text
    if set(rest) == {"`"}:
        return True
    if rest.startswith("```"):
        rest = rest[3:]
        if "json".startswith(rest.strip()):
            return True
        rest = rest.removeprefix("json").lstrip()
        if not rest.startswith("{"):
            return False
    squeezed = re.sub(r"\s", "", rest)
    return '{"name":'.startswith(squeezed)


class Llama3JsonFormat(ToolFormat):
    name = "llama3_json"
    arguments_key = "parameters"
    _python_tag = "<|python_tag|>"

    def opens_call(self, text: str) -> int | None:
        head = text.lstrip()
        if head.startswith(self._python_tag) or head.startswith("{"):
            return 0
        return None

    def may_open_call(self, text: str) -> int:
        head = text.lstrip()
        return len(text) if not head or self._python_tag.startswith(head) else 0

    def _parse_calls(self, text: str) -> list[RawCall]:
        rest = text.strip().removeprefix(self._python_tag).strip()
        decoder = json.JSONDecoder()
        calls = []
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except json.JSONDecodeError as exc:
                raise MalformedCall(f"the call is not JSON: {exc}") from exc
            calls.append(self._raw_call(obj))
            rest = rest[end:].strip().removeprefix(";").strip()
        return calls

    def root_rule(self, call_rule: str, parallel: bool) -> str:
        return _repeat(call_rule, '";" space', parallel)


class MistralFormat(ToolFormat):
    name = "mistral"
    trigger = "[TOOL_CALLS]"

    def _parse_calls(self, text: str) -> list[RawCall]:
        body = text.removeprefix(self.trigger).strip()
        if body.startswith("["):
            items = _load(body)
            if not isinstance(items, list):
                raise MalformedCall("[TOOL_CALLS] must be followed by a JSON array")
            return [self._raw_call(item) for item in items]
        calls = []  # the v11+ form: name[ARGS]{...}, one per [TOOL_CALLS]
        for part in body.split(self.trigger):
            name, sep, arguments = part.partition("[ARGS]")
            if not sep:
                raise MalformedCall("a call must be name[ARGS]{...}")
            calls.append(self._raw_call({"name": name.strip(), "arguments": _load(arguments.strip())}))
        return calls

    def root_rule(self, call_rule: str, parallel: bool) -> str:
        calls = _repeat(call_rule, '","', parallel)
        return f'"[TOOL_CALLS]" "[" {calls} "]"'

    def new_id(self) -> str:
        return new_call_id(9, prefix="")  # Mistral's templates refuse ids of other lengths


FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat)}
# What in a chat template's source says which format the model was trained on.
_TEMPLATE_MARKERS = (
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "hermes"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython", "llama3_json"),
)


def format_for_template(source: str) -> str | None:
    """The tool-call format a chat template renders calls in, or None when it shows none we know."""
    return next((name for marker, name in _TEMPLATE_MARKERS if marker in source), None)
