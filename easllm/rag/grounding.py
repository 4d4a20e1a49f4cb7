"""The grounded prompt of a RAG round.

With a chat template the instruction and the numbered excerpts go to the system part and the
question stays the user's own message: on the knowledge set (bench/knowledge_quality.py) the
bundled 0.5B model held the fact in 80% of its answers that way, 70% with the excerpts and the
question in one user message. Without a template: one text, the question last."""

from __future__ import annotations

import re
from collections.abc import Sequence

from easllm.rag.store import Hit

INSTRUCTION = (
    "Answer the question using only the numbered excerpts from the knowledge base below. "
    "If they do not contain the answer, say that the documents do not cover it. "
)
INSTRUCTION_WITH_TOOLS = (
    "Answer using the numbered excerpts from the knowledge base below and the tools you are given. "
    "Answer in the language of the question."
)
NO_MATCH_WITH_TOOLS = "No excerpt of the knowledge base matches the question; use the tools you are given."
# Said in the question's own language too: a small model follows that better than "the question's".
ANSWER_IN = {
    "ja": "Answer in Japanese. 日本語で答えてください。",
    "zh": "Answer in Chinese. 请用中文回答。",
    "ko": "Answer in Korean. 한국어로 답하세요.",
}
ANSWER_IN_QUESTION_LANGUAGE = "Answer in the language of the question."
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af]")
_HAN = re.compile(r"[\u4e00-\u9fff]")
NO_MATCH = (
    "No excerpt of the knowledge base matches the question. "
    "Say that the documents do not cover it; do not answer from memory."
)


def question_language(text: str) -> str | None:
    """'ja' (any kana), 'zh' (Han without kana), 'ko' (Hangul), else None."""
    if _KANA.search(text):
        return "ja"
    if _HANGUL.search(text):
        return "ko"
    if _HAN.search(text):
        return "zh"
    return None


def answer_language(question: str) -> str:
    return ANSWER_IN.get(question_language(question) or "", ANSWER_IN_QUESTION_LANGUAGE)


def excerpt_label(hit: Hit) -> str:
    """'install.md, page 2, Setup > pip': where an excerpt comes from."""
    chunk = hit.chunk
    parts = [chunk.source]
    if chunk.page is not None:
        parts.append(f"page {chunk.page}")
    if chunk.heading:
        parts.append(chunk.heading)
    return ", ".join(parts)


def grounded_system(
    system_prompt: str, hits: Sequence[Hit], question: str, *, with_tools: bool = False
) -> str:
    """The system part of a RAG round: the deployment's system prompt, the instruction (in the
    question's language) and the excerpts. The user's messages and tool messages stay as they are."""
    head = f"{system_prompt.strip()}\n\n" if system_prompt.strip() else ""
    if not hits:
        return head + (NO_MATCH_WITH_TOOLS if with_tools else f"{NO_MATCH} {answer_language(question)}")
    instruction = INSTRUCTION_WITH_TOOLS if with_tools else f"{INSTRUCTION}{answer_language(question)}"
    return f"{head}{instruction}\n\nExcerpts:\n\n{_excerpts(hits)}"


def _excerpts(hits: Sequence[Hit]) -> str:
    return "\n\n".join(f"[{i}] ({excerpt_label(hit)})\n{hit.chunk.content}" for i, hit in enumerate(hits, 1))


def grounded_completion(question: str, hits: Sequence[Hit], system_prompt: str = "") -> str:
    """The whole prompt, as plain text, for a model without a chat template (or --no-template)."""
    return f"{grounded_system(system_prompt, hits, question)}\n\nQuestion: {question}\n\nAnswer:"
