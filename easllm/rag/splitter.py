"""Sections -> chunks of at most `chunk_size` characters, cut at the largest natural boundary.

LangChain's `RecursiveCharacterTextSplitter` with separators for CJK as well as Latin text:
Japanese and Chinese have no spaces, so sentences end at 。！？ and clauses at 、，；.
"""

from __future__ import annotations

from dataclasses import dataclass

from easllm.rag.loaders import Document

# Largest boundary first; each separator stays at the end of the piece it closes.
SEPARATORS = [
    "\n\n",
    "\n",
    "。",
    "！",
    "？",
    "．",
    ". ",
    "! ",
    "? ",
    "；",
    "; ",
    "、",
    "，",
    ", ",
    " ",
    "",
]


@dataclass(frozen=True)
class Chunk:
    """One indexed passage and where it came from."""

    source: str  # file name
    content: str
    page: int | None = None
    heading: str | None = None

    def embedding_text(self) -> str:
        """The text the embedder sees: the heading path gives a chunk its context."""
        if self.heading and not self.content.startswith("#"):
            return f"{self.heading}\n{self.content}"
        return self.content


class Splitter:
    def __init__(self, chunk_size: int = 500, chunk_overlap: int = 50) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError("chunk_overlap must be >= 0 and smaller than chunk_size")
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self._splitter = RecursiveCharacterTextSplitter(
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            separators=SEPARATORS,
            keep_separator="end",
            strip_whitespace=True,
        )

    def split_text(self, text: str) -> list[str]:
        return [t for t in self._splitter.split_text(text) if t.strip()]

    def split(self, doc: Document) -> list[Chunk]:
        return [
            Chunk(doc.name, text, section.page, section.heading)
            for section in doc.sections
            for text in self.split_text(section.text)
        ]
