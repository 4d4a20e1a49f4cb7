"""`--model-path` -> a file or directory on this machine, and the engine that fits it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from easllm.errors import ModelNotFound
from easllm.models.bundled import Progress, bundled_model, ensure_bundled
from easllm.models.catalog import CatalogEntry, catalog_entry


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    format: Literal["gguf", "hf"]
    catalog: CatalogEntry | None = None

    @property
    def default_engine(self) -> str:
        return "llamacpp" if self.format == "gguf" else "transformers"


def resolve_model(spec: str, home: Path, progress: Progress) -> ResolvedModel:
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
    entry = catalog_entry(spec)
    if entry is not None:
        return ResolvedModel(entry.name, _catalog_path(entry, home), "hf", entry)
    raise ModelNotFound(
        f"unknown model {spec!r}: use a bundled name (qwen2.5-0.5b-instruct, gemma3-270m), a catalog "
        "name (easllm models), a Hugging Face directory with config.json, or a .gguf file"
    )


def _catalog_path(entry: CatalogEntry, home: Path) -> Path:
    local = home / "models" / entry.name
    if (local / "config.json").is_file():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(entry.repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelNotFound(
            f"catalog model {entry.name} ({entry.repo_id}, {entry.params_b}B parameters) is not on this "
            f"machine. Put its Hugging Face files (config.json, weights, tokenizer) in {local}, or into "
            "the Hugging Face cache (`hf download "
            f"{entry.repo_id}` on a machine with internet, then copy ~/.cache/huggingface/hub)."
        ) from exc
