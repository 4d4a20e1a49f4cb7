"""The WebUI page: a Gradio Blocks app with a header (model, engine), the shared system prompt
and sampling controls, a Chat tab and a knowledge-base tab. `webui/mount.py` serves it."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from easllm import __version__
from easllm.config import ServerConfig
from easllm.engine.base import Engine
from easllm.errors import NotReady
from easllm.server.state import ServiceState
from easllm.webui.chat_tab import ChatResponder, ParameterControls, build_chat_panel
from easllm.webui.knowledge_tab import build_knowledge_tab
from easllm.webui.messages import default_controls, md_escape

log = logging.getLogger(__name__)

CSS = """
#easllm-header { margin-bottom: 0; }
#chat-stats, #kb-stats {
  font-size: var(--text-sm); color: var(--body-text-color-subdued); min-height: 1.5em;
}
"""


def model_banner(engine: Engine, config: ServerConfig, load_error: str | None = None) -> str:
    """The page's first line: which model and engine answer, and whether they are up yet."""
    health = engine.health()
    logout = " · [Log out](logout)" if config.token else ""
    service = f"**easllm** {__version__} · service `{config.service_name}`"
    if load_error:
        return f"{service} · **the model failed to load:** {md_escape(load_error)}{logout}"
    try:
        info = engine.model_info
    except NotReady:
        return f"{service} · the model is loading…{logout}"
    state = "ready" if health.ready else "starting"
    return (
        f"**easllm** {__version__} · service `{config.service_name}` · model **{info.name}** · "
        f"engine **{info.engine}** · context {info.context_length} tokens · {state}{logout}"
    )


def build_blocks(state: ServiceState) -> gr.Blocks:
    config = state.config
    engine = state.engine
    defaults = default_controls(config.sampling)
    title = f"easllm · {config.service_name}"
    # delete_cache: uploads older than an hour go, and all of them at shutdown.
    blocks = gr.Blocks(title=title, analytics_enabled=False, fill_width=True, delete_cache=(3600, 3600))
    with blocks:
        banner = gr.Markdown(model_banner(engine, config, state.load_error), elem_id="easllm-header")
        with gr.Accordion("System prompt and parameters", open=False, elem_id="parameters"):
            system_prompt = gr.Textbox(
                label="System prompt",
                placeholder="e.g. You are a helpful assistant. (empty: the model's default)",
                lines=2,
                elem_id="system-prompt",
            )
            with gr.Row():
                controls = ParameterControls(
                    system_prompt,
                    gr.Slider(
                        1,
                        int(config.sampling.max_new_tokens),
                        value=int(defaults.max_new_tokens),
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    ),
                    gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
                    gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top p"),
                    gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top k (0 = off)"),
                )
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                responder = ChatResponder(state.chat)
                build_chat_panel(responder, controls, "chat", "Type a message and press Send…")
            with gr.Tab("Knowledge base (LangChain)", id="knowledge", elem_id="tab-knowledge"):
                table, chosen, status, actions = build_knowledge_tab(state.knowledge, state.chat, controls)

        def banner_now() -> str:
            return model_banner(engine, config, state.load_error)

        async def on_load() -> tuple[str, list[list[Any]], Any, str]:
            rows, choices, summary = await actions.refresh()
            return banner_now(), rows, choices, summary

        def on_tick() -> tuple[str, gr.Timer]:
            """Until the model is up, the banner is refreshed; then the timer stops."""
            waiting = not engine.health().ready and not state.load_error
            return banner_now(), gr.Timer(active=waiting)

        blocks.load(on_load, outputs=[banner, table, chosen, status], api_visibility="private")
        timer = gr.Timer(2.0, active=not engine.health().ready)
        timer.tick(on_tick, outputs=[banner, timer], show_progress="hidden", api_visibility="private")
    return blocks


def token_checker(token: str) -> Callable[[str, str], bool]:
    """Gradio's login: any user name; the password must be the service token (constant time)."""
    expected = token.encode()

    def check(_user: str, password: str) -> bool:
        return hmac.compare_digest((password or "").encode(), expected)

    return check
