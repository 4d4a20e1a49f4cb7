"""The knowledge base of earlier versions (a FaissStore folder) moves into the database once.

Before the database, a service kept `knowledge/index/` (FAISS generations and `manifest.json`) and
`knowledge/files/<digest>/<name>` (originals). On the first start with a `SqlStore`, the committed
generation and its originals are copied into the store in one transaction, which only fills a base
that holds no file and was never migrated (two replicas starting at once migrate it once), and the
old folders are renamed `*.migrated` so that nothing reads them again; they may be deleted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from easllm.rag.sql_store import FileImport, SqlStore
from easllm.rag.store import read_generation

log = logging.getLogger(__name__)

MIGRATED = ".migrated"


def migrate_faiss_folder(store: SqlStore, root: Path) -> int:
    """Import the FaissStore knowledge base under `root` into `store`; the files imported (0: none)."""
    index_dir = root / "index"
    if not (index_dir / "manifest.json").is_file():
        return 0
    import faiss

    try:
        state = read_generation(index_dir, faiss)
    except FileNotFoundError:  # another replica migrated it and renamed the folder meanwhile
        return 0
    empty = np.zeros((0, 0), dtype=np.float32)  # an index-less knowledge base has no chunks
    vectors = state.index.reconstruct_n(0, state.index.ntotal) if state.index is not None else empty
    items = []
    for f in state.files.values():
        rows = [i for i, c in enumerate(state.chunks) if c.source == f.name]
        original = root / "files" / f.sha256[:16] / f.name
        data = original.read_bytes() if original.is_file() else None
        if data is None:
            log.warning("knowledge base migration: the original of %s is missing; its chunks move", f.name)
        items.append(FileImport(f, [state.chunks[i] for i in rows], vectors[rows], data))
    if not store.import_files(items, state.embedder, str(index_dir)):
        log.warning(
            "knowledge base: %s was not migrated: the database already holds the knowledge base %s",
            index_dir,
            store.name,
        )
        return 0
    for folder in (index_dir, root / "files"):
        if folder.exists():
            folder.rename(_free_name(folder))
    log.info(
        "knowledge base: %d files (%d chunks) of %s moved into %s",
        len(items),
        len(state.chunks),
        index_dir,
        store.url,
    )
    return len(items)


def _free_name(folder: Path) -> Path:
    target = folder.with_name(folder.name + MIGRATED)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{MIGRATED}-{n}")
    return target
