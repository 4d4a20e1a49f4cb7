"""The knowledge-base ("LangChain") tab: upload, index with progress, list, delete, and ask.

Indexing calls the service's KnowledgeBase in a worker thread (parsing and embedding block), the
same object the /v1/knowledge routes and `langchain: true` requests use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from easllm.errors import InvalidRequest
from easllm.rag.knowledge import FileNotInKnowledgeBase, IngestProgress, KnowledgeBase
from easllm.rag.loaders import KINDS
from easllm.serving.chat import ChatServing
from easllm.webui.chat_tab import ChatResponder, ParameterControls, build_chat_panel
from easllm.webui.messages import FILE_COLUMNS, file_rows, md_escape, plural

log = logging.getLogger(__name__)

ACCEPTED = ", ".join(sorted({k.upper() for k in KINDS.values()}))
STAGES = {"parsing": "reading", "saving": "saving", "done": "done", "unchanged": "unchanged, kept"}


class KnowledgeActions:
    """Handlers of the tab's buttons; each returns the status text, the file table and the choices."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.kb = kb

    def listing(self) -> tuple[list[list[Any]], Any]:
        files = self.kb.files()
        names = [f.name for f in sorted(files, key=lambda f: f.name.lower())]
        return file_rows(files), gr.update(choices=names, value=[])

    async def refresh(self) -> tuple[list[list[Any]], Any, str]:
        rows, choices = await asyncio.to_thread(self.listing)
        return rows, choices, self.summary()

    def summary(self) -> str:
        files = self.kb.files()
        if not files:
            return "The knowledge base is empty."
        chunks = plural(self.kb.chunk_count(), "chunk")
        return f"{plural(len(files), 'file')}, {chunks} indexed (embedder {self.kb.embedder_name})."

    async def index(
        self,
        paths: Sequence[str] | str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio injects it)
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Index the uploaded files one by one; each file's outcome is a line of the status."""
        chosen = [paths] if isinstance(paths, str) else list(paths or [])
        if not chosen:
            raise gr.Error(f"Choose files first ({ACCEPTED}).", duration=8, print_exception=False)
        lines: list[str] = []
        failed = 0
        total = len(chosen)
        for i, path in enumerate(chosen):
            name = Path(path).name
            status = "\n".join([*lines, f"- indexing {md_escape(name)} ({i + 1} of {total})…"])
            yield gr.update(), gr.update(), status, gr.update()

            def report(p: IngestProgress, i: int = i) -> None:
                share = p.done / p.total if p.total else 0.0
                stage = p.describe() if p.stage == "embedding" else STAGES.get(p.stage, p.stage)
                progress((i + share) / total, desc=f"{p.file}: {stage}")

            try:
                stored = await asyncio.to_thread(self._add, name, Path(path), report)
            except InvalidRequest as exc:
                failed += 1
                log.info("webui: %s refused: %s", name, exc.message)
                lines.append(f"- **refused** {md_escape(exc.message)}")
            else:
                pages = f", {stored.pages} pages" if stored.pages else ""
                lines.append(f"- **added** {md_escape(stored.name)}: {plural(stored.chunks, 'chunk')}{pages}")
        if failed:
            gr.Warning(f"{failed} of {total} files could not be indexed: see the status below.")
        rows, choices = await asyncio.to_thread(self.listing)
        summary = self.summary()
        yield None, rows, "\n".join([*lines, "", summary]), choices

    def _add(self, name: str, path: Path, report: Any) -> Any:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"{name}: the upload could not be read ({exc.strerror})", "files") from exc
        return self.kb.add_file(name, data, report)

    async def delete(self, names: Sequence[str] | str | None) -> tuple[list[list[Any]], Any, str]:
        chosen = [names] if isinstance(names, str) else list(names or [])
        if not chosen:
            raise gr.Error("Pick the files to delete in the list first.", duration=6, print_exception=False)
        removed, missing = [], []
        for name in chosen:
            try:
                await asyncio.to_thread(self.kb.remove_file, name)
                removed.append(name)
            except FileNotInKnowledgeBase:
                missing.append(name)
        rows, choices = await asyncio.to_thread(self.listing)
        lines = [f"- **deleted** {md_escape(n)}" for n in removed]
        lines += [f"- **not found** {md_escape(n)} is not in the knowledge base" for n in missing]
        return rows, choices, "\n".join([*lines, "", self.summary()])


def build_knowledge_tab(
    kb: KnowledgeBase, chat: ChatServing, controls: ParameterControls
) -> tuple[gr.Dataframe, gr.Dropdown, gr.Markdown, KnowledgeActions]:
    """The tab's layout and events; returns what the page refreshes when it loads."""
    actions = KnowledgeActions(kb)
    gr.Markdown(
        f"Upload {ACCEPTED} files (several at once), press **Vectorstore knowledge** to index them, "
        "then ask questions answered from them. Each answer lists the excerpts it used."
    )
    with gr.Row():
        with gr.Column(scale=3):
            uploads = gr.File(
                label=f"Files ({ACCEPTED})",
                file_count="multiple",
                type="filepath",
                elem_id="kb-upload",
                height=140,
            )
            index = gr.Button("Vectorstore knowledge", variant="primary", elem_id="kb-index")
            status = gr.Markdown("", elem_id="kb-status")
        with gr.Column(scale=4):
            table = gr.Dataframe(
                headers=FILE_COLUMNS,
                value=[],
                interactive=False,
                label="Indexed files",
                elem_id="kb-files",
                max_height=260,
            )
            with gr.Row(equal_height=True):
                chosen = gr.Dropdown(
                    choices=[],
                    multiselect=True,
                    label="Files to delete",
                    elem_id="kb-delete-choice",
                    scale=4,
                )
                delete = gr.Button("Delete", variant="stop", elem_id="kb-delete", scale=1)
    index.click(
        actions.index,
        inputs=[uploads],
        outputs=[uploads, table, status, chosen],
        concurrency_limit=1,
        concurrency_id="kb-write",
        show_progress_on=[status],
        api_visibility="private",
    )
    delete.click(
        actions.delete,
        inputs=[chosen],
        outputs=[table, chosen, status],
        concurrency_limit=1,
        concurrency_id="kb-write",
        api_visibility="private",
    )
    responder = ChatResponder(chat, use_knowledge=True)
    build_chat_panel(responder, controls, "kb", "Ask a question about the indexed files…")
    return table, chosen, status, actions
