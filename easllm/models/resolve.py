"""`--model-path` -> a file or directory on this machine (fetched first if need be), and its engine."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from easllm.config import EngineConfig
from easllm.errors import ModelNotFound
from easllm.models.bundled import Progress, bundled_model, ensure_bundled
from easllm.models.catalog import CatalogEntry
from easllm.models.lock import model_lock
from easllm.models.pull import local_pull, pull, remote_ref


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    format: Literal["gguf", "hf"]
    catalog: CatalogEntry | None = None

    @property
    def default_engine(self) -> str:
        return "llamacpp" if self.format == "gguf" else "transformers"


def resolve_model(
    spec: str,
    home: Path,
    progress: Progress,
    engine: str | None = None,
    quantization: str | None = None,
    source: str = "huggingface",
    gpu: bool = False,
) -> ResolvedModel:
    """A bundled name, a local file or folder, or a model to fetch (pulled once, then local)."""
    bundled = bundled_model(spec)
    if bundled is not None:
        return ResolvedModel(bundled.name, ensure_bundled(bundled, home, progress), "gguf")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf model")
        return ResolvedModel(path.stem, path, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(path.name, path, "hf")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(ggufs[0].stem, ggufs[0], "gguf")
        raise ModelNotFound(f"{path} holds no config.json (Hugging Face format) and no single .gguf file")
    ref = remote_ref(spec, engine, quantization, source, gpu)
    if ref is None:
        raise ModelNotFound(
            f"unknown model {spec!r}: use a bundled name (qwen2.5-0.5b-instruct, gemma3-270m), a catalog "
            "name (easllm models), a hub repository ORG/REPO[:QUANT], s3://bucket/prefix/, a Hugging Face "
            "directory with config.json, or a .gguf file"
        )
    with model_lock(home / "pulled" / ref.key, progress):  # one pull per model on this machine
        pulled = local_pull(ref, home) or pull(ref, home, progress)
    fmt: Literal["gguf", "hf"] = "gguf" if pulled.format == "gguf" else "hf"
    return ResolvedModel(ref.name, pulled.path, fmt, ref.catalog)


def resolve_configured(config: EngineConfig, home: Path, progress: Progress) -> ResolvedModel:
    """The model an `easllm serve` configuration names, pulled first when it is remote and absent."""
    gpu = not config.cpu and shutil.which("nvidia-smi") is not None
    return resolve_model(
        config.model_path, home, progress, config.engine, config.quantization, config.model_source, gpu
    )
