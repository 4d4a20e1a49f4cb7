"""A chat panel: the message box, Send / Stop / Clear, and the answer streaming in.

Used twice: by the Chat tab (plain chat) and by the knowledge-base tab (`use_knowledge`: grounded on
the service's knowledge base, with the sources under each answer). Both call the service's own
serving layer in-process (`ChatServing.converse`, as the EAS API does), so the WebUI shares the
API's engine, queue, knowledge base, metrics and history export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import gradio as gr

from easllm.engine.types import Usage
from easllm.errors import failure
from easllm.serving.caller import Caller
from easllm.serving.chat import ChatServing, Turn
from easllm.webui.messages import (
    Controls,
    Message,
    assistant_message,
    conversation,
    sources_message,
    stats_line,
    user_message,
)

log = logging.getLogger(__name__)

Update = tuple[Any, list[Message], str]  # (message box, chat, stats line)


@dataclass
class ParameterControls:
    """The shared controls (system prompt and sampling), created once and read by every chat."""

    system_prompt: gr.Textbox
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider

    def inputs(self) -> list[gr.components.Component]:
        return [self.system_prompt, self.max_new_tokens, self.temperature, self.top_p, self.top_k]


class ChatResponder:
    """The event handler behind Send: one round, streamed; closing it (Stop) aborts the engine request."""

    def __init__(self, chat: ChatServing, use_knowledge: bool = False) -> None:
        self.chat = chat
        self.use_knowledge = use_knowledge
        self.api = "webui.knowledge" if use_knowledge else "webui"

    async def respond(
        self,
        message: str,
        chat: list[Message] | None,
        system_prompt: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        request: gr.Request | None = None,
    ) -> AsyncIterator[Update]:
        text = (message or "").strip()
        chat = list(chat or [])
        if not text:
            raise gr.Error("Type a message first.", duration=5, print_exception=False)
        controls = Controls(system_prompt or "", max_new_tokens, temperature, top_p, top_k)
        if self.use_knowledge:
            self._require_knowledge()
        conv = conversation(text, chat, controls.system_prompt)
        turn = Turn(self.api, conv, controls.sampling(), use_knowledge=self.use_knowledge)
        browser = Caller(
            client=getattr(getattr(request, "client", None), "host", None),
            session=getattr(request, "session_hash", None),
        )
        try:
            generation = await self.chat.converse(turn, browser, start=False)
        except Exception as exc:
            raise _page_error(exc) from exc
        shown = [*chat, user_message(text), assistant_message("")]
        yield "", list(shown), "Generating…"
        parts: list[str] = []
        usage: Usage | None = None
        finish: str | None = None
        started = time.monotonic()
        first_at: float | None = None
        try:
            async with aclosing(generation.streams[0]) as deltas:
                async for delta in deltas:
                    if delta.text:
                        first_at = first_at or time.monotonic()
                        parts.append(delta.text)
                        shown[-1] = assistant_message("".join(parts))
                    if delta.finish_reason is not None:
                        usage, finish = delta.usage, delta.finish_reason.value
                    yield "", list(shown), ""
        except Exception as exc:
            log.warning("webui: generation failed: %s", exc)
            if not parts:  # nothing shown yet: give the message back for another try
                yield text, chat, ""
            raise _page_error(exc) from exc
        if self.use_knowledge:
            shown.append(sources_message(generation.sources))
        ended = time.monotonic()
        first = (first_at or ended) - started
        yield "", shown, stats_line(usage, ended - started, first, finish)

    def _require_knowledge(self) -> None:
        kb = self.chat.knowledge
        if kb is None or kb.is_empty():
            raise gr.Error(
                "The knowledge base is empty: upload files above and press “Vectorstore knowledge” first.",
                duration=None,
                print_exception=False,
            )


def _page_error(exc: Exception) -> gr.Error:
    """The error policy's answer, as the page shows it: one to wait out, or one to read."""
    failed = failure(exc)
    if failed.retry_after is not None:
        return gr.Error(f"{failed.message}: try again in a moment.", print_exception=False)
    return gr.Error(failed.message, duration=None, print_exception=False)


def build_chat_panel(
    responder: ChatResponder, controls: ParameterControls, prefix: str, placeholder: str
) -> gr.Chatbot:
    """Lay out one chat and wire its events; `prefix` makes the element ids unique on the page."""
    chatbot = gr.Chatbot(
        label="Conversation",
        elem_id=f"{prefix}-chatbot",
        height=460,
        buttons=["copy", "copy_all"],
        feedback_options=None,
        group_consecutive_messages=False,
    )
    box = gr.Textbox(
        placeholder=placeholder,
        show_label=False,
        lines=1,  # Enter sends, Shift+Enter starts a new line; the box grows to max_lines
        max_lines=8,
        elem_id=f"{prefix}-message",
        submit_btn=False,
    )
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id=f"{prefix}-send", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop", scale=1)
        clear = gr.Button("Clear", elem_id=f"{prefix}-clear", scale=1)
    stats = gr.Markdown("", elem_id=f"{prefix}-stats")

    inputs = [box, chatbot, *controls.inputs()]
    outputs = [box, chatbot, stats]
    common: dict[str, Any] = {
        "inputs": inputs,
        "outputs": outputs,
        "concurrency_limit": None,  # the engine queues and batches; Gradio should not serialise users
        "show_progress": "hidden",
        "api_visibility": "private",
    }
    by_click = send.click(responder.respond, **common)
    by_enter = box.submit(responder.respond, **common)
    running: list[Any] = [by_click, by_enter]  # gradio annotates `cancels` as dicts; it takes these
    stop.click(None, cancels=running, api_visibility="private")
    clear.click(_cleared, outputs=[box, chatbot, stats], cancels=running, api_visibility="private")
    chatbot.clear(None, cancels=running, api_visibility="private")  # its own bin icon stops an answer too
    return chatbot


def _cleared() -> Update:
    return "", [], ""
