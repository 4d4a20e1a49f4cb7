"""FaissStore: cosine search, replace and remove by file, persistence, and crash safety."""

from pathlib import Path

import numpy as np
import pytest

from easllm.rag import store as store_module
from easllm.rag.splitter import Chunk
from easllm.rag.store import FaissStore, StoredFile


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def put(store: FaissStore, name: str, vectors: list[np.ndarray], embedder: str = "e") -> None:
    chunks = [Chunk(name, f"{name} chunk {i}", page=i + 1) for i in range(len(vectors))]
    record = StoredFile(name, "txt", 10, len(chunks), None, 1.0, f"sha-{name}")
    store.put_file(record, chunks, np.stack(vectors), embedder)


def test_search_ranks_by_cosine(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0, 0), unit(0, 1, 0)])
    put(store, "b.txt", [unit(1, 1, 0)])
    hits = store.search(unit(1, 0.1, 0), 3)
    assert [h.chunk.content for h in hits] == ["a.txt chunk 0", "b.txt chunk 0", "a.txt chunk 1"]
    assert hits[0].score == pytest.approx(float(unit(1, 0.1, 0) @ unit(1, 0, 0)), abs=1e-5)
    assert hits[0].chunk.page == 1


def test_same_name_replaces_the_old_chunks(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0, 0), unit(0, 1, 0)])
    put(store, "b.txt", [unit(0, 0, 1)])
    put(store, "a.txt", [unit(0, 1, 1)])
    assert store.chunk_count() == 2
    assert [f.chunks for f in store.files()] == [1, 1]
    assert store.search(unit(0, 0, 1), 1)[0].chunk.source == "b.txt"


def test_remove_then_reopen_keeps_only_the_rest(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0, 0)])
    put(store, "b.txt", [unit(0, 1, 0), unit(0, 1, 1)])
    removed = store.remove_file("a.txt")
    assert removed is not None and removed.name == "a.txt"
    assert store.remove_file("a.txt") is None
    reopened = FaissStore(tmp_path)
    assert [f.name for f in reopened.files()] == ["b.txt"]
    assert [h.chunk.source for h in reopened.search(unit(1, 0, 0), 5)] == ["b.txt", "b.txt"]
    assert reopened.embedder == "e"


def test_removing_the_last_file_empties_the_store(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0)])
    store.remove_file("a.txt")
    reopened = FaissStore(tmp_path)
    assert reopened.chunk_count() == 0 and reopened.embedder is None
    assert reopened.search(unit(1, 0), 3) == []


def test_only_the_committed_generation_is_left_on_disk(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    for name in ("a.txt", "b.txt", "c.txt"):
        put(store, name, [unit(1, 0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-3.faiss", "gen-3.json", "manifest.json"]


def test_a_crash_before_the_manifest_keeps_the_previous_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0)])
    real_write = store_module.write_atomic

    def dies_at_the_manifest(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            (path.parent / ".manifest.json.half.tmp").write_bytes(data[: len(data) // 2])
            raise OSError("killed")
        real_write(path, data)

    monkeypatch.setattr(store_module, "write_atomic", dies_at_the_manifest)
    with pytest.raises(OSError):
        put(store, "b.txt", [unit(0, 1)])
    monkeypatch.setattr(store_module, "write_atomic", real_write)
    assert [f.name for f in store.files()] == ["a.txt"]  # memory unchanged too
    reopened = FaissStore(tmp_path)
    assert [f.name for f in reopened.files()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-1.faiss", "gen-1.json", "manifest.json"]


def test_vectors_of_another_embedder_or_size_are_refused(tmp_path: Path) -> None:
    store = FaissStore(tmp_path)
    put(store, "a.txt", [unit(1, 0)], embedder="e5")
    with pytest.raises(ValueError, match="e5"):
        put(store, "b.txt", [unit(0, 1)], embedder="minilm")
    with pytest.raises(ValueError, match="2-d"):
        put(store, "b.txt", [unit(0, 1, 0)], embedder="e5")


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    store_module.write_atomic(target, b"one")
    store_module.write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
