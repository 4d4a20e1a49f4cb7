"""What the WebUI shows and reads back, with no Gradio in it: chat messages <-> conversation rounds,
the parameter controls -> SamplingParams, sources and knowledge-base files as Markdown/table rows.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from easllm.chat.template import Conversation
from easllm.config import SamplingDefaults
from easllm.engine.types import SamplingParams, Usage
from easllm.rag.store import StoredFile
from easllm.serving.prompts import Source

Message = dict[str, Any]  # {"role": "user"|"assistant", "content": str, "metadata": {...}}
EXCERPT_CHARS = 280
SOURCES_TITLE = "Sources"


@dataclass(frozen=True)
class Controls:
    """The parameter controls' values, as the page sends them (numbers may arrive as floats)."""

    system_prompt: str
    max_new_tokens: float
    temperature: float
    top_p: float
    top_k: float

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max(1, int(self.max_new_tokens)),
            temperature=max(0.0, float(self.temperature)),
            top_k=max(0, int(self.top_k)),
            top_p=min(1.0, max(0.01, float(self.top_p))),
        )


def default_controls(defaults: SamplingDefaults) -> Controls:
    top_p, top_k = defaults.top_p or 1.0, defaults.top_k or 0
    return Controls("", defaults.max_new_tokens, defaults.temperature, top_p, top_k)


def user_message(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant_message(text: str) -> Message:
    return {"role": "assistant", "content": text}


def is_annotation(message: Message) -> bool:
    """Messages the UI adds under an answer (sources): shown, never sent back to the model."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title"))


def message_text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def rounds(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a chat, in order; annotations skipped, an unanswered turn dropped."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for message in messages:
        if is_annotation(message):
            continue
        role, text = message.get("role"), message_text(message)
        if role == "user":
            pending = text if pending is None else f"{pending}\n{text}"
        elif role == "assistant":
            if pending is not None:
                pairs.append((pending, text))
                pending = None
            elif pairs:  # one answer shown as two messages
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + text)
    return pairs


def conversation(prompt: str, messages: Sequence[Message], system_prompt: str) -> Conversation:
    return Conversation(prompt, system_prompt.strip(), tuple(rounds(messages)))


def sources_message(sources: Sequence[Source]) -> Message:
    """A collapsible note under an answer: the title names the files, the body holds the excerpts."""
    return {
        "role": "assistant",
        "content": sources_markdown(sources),
        "metadata": {"title": sources_title(sources)},
    }


def sources_title(sources: Sequence[Source]) -> str:
    if not sources:
        return f"{SOURCES_TITLE}: none (no excerpt of the knowledge base matched)"
    names: list[str] = []
    for s in sources:
        label = s.source if s.page is None else f"{s.source} (p. {s.page})"
        if label not in names:
            names.append(label)
    return f"{SOURCES_TITLE}: {', '.join(names)}"


def sources_markdown(sources: Sequence[Source]) -> str:
    if not sources:
        return "The answer did not use the knowledge base."
    lines = []
    for i, s in enumerate(sources, 1):
        where = [f"**{md_escape(s.source)}**"]
        if s.page is not None:
            where.append(f"page {s.page}")
        if s.heading:
            where.append(md_escape(s.heading))
        where.append(f"score {s.score:.2f}")
        lines.append(f"{i}. {' · '.join(where)}\n\n   > {_excerpt(s.content)}")
    return "\n\n".join(lines)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) > EXCERPT_CHARS:
        flat = flat[: EXCERPT_CHARS - 1].rstrip() + "…"
    return md_escape(flat)


def md_escape(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "\\`*_[]<>#|" else ch for ch in text)


def stats_line(usage: Usage | None, seconds: float, first_token: float, finish: str | None) -> str:
    """One line under an answer: tokens, time, the wait for the first token and the decode rate."""
    if usage is None:
        return ""
    n = usage.completion_tokens
    decoding = seconds - first_token
    rate = (n - 1) / decoding if n > 1 and decoding > 0 else 0.0
    ended = {"stop": "finished", "length": "stopped at max new tokens", "abort": "stopped"}.get(
        finish or "", finish or ""
    )
    cached = f" ({usage.cached_tokens} cached)" if usage.cached_tokens else ""
    return (
        f"{plural(n, 'token')} in {seconds:.1f} s (first after {first_token:.1f} s, {rate:.1f} tokens/s) · "
        f"prompt {plural(usage.prompt_tokens, 'token')}{cached} · {ended}"
    )


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


FILE_COLUMNS = ["File", "Type", "Size", "Chunks", "Pages", "Added"]


def file_rows(files: Sequence[StoredFile]) -> list[list[Any]]:
    return [
        [
            f.name,
            f.kind.upper(),
            human_size(f.size),
            f.chunks,
            "" if f.pages is None else f.pages,
            datetime.datetime.fromtimestamp(f.added_at).strftime("%Y-%m-%d %H:%M"),
        ]
        for f in sorted(files, key=lambda f: f.name.lower())
    ]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
