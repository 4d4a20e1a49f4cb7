"""What a pull will fetch, before it fetches: the files a model needs from a listing, their sizes,
and whether they fit on the disk. Shared by every source (hub, ModelScope, S3)."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from easllm.errors import ModelNotFound, PullFailed

GIB = 1 << 30
DISK_MARGIN = 256 << 20  # left free after a pull
SPLIT = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)", re.IGNORECASE)
QUANT = re.compile(r"(?<![a-z0-9])(i?q\d[a-z0-9_]*|f16|bf16|f32|fp16)(?=[.-]|$)", re.IGNORECASE)
HF_SUFFIXES = (".json", ".safetensors", ".model", ".tiktoken", ".txt", ".py", ".jinja")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path inside the repository or prefix
    size: int | None
    sha256: str | None = None  # the hub's SHA-256 for large (LFS) files
    etag: str | None = None  # object storage: the object's ETag


@dataclass(frozen=True)
class RemotePlan:
    source: str  # huggingface | modelscope | s3
    repo_id: str
    revision: str | None
    format: str  # gguf | hf
    files: list[RemoteFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def weights_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.name.endswith((".gguf", ".safetensors", ".bin")))

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _stem(name: str) -> str:
    return SPLIT.sub("", name)


def quantizations(names: list[str]) -> list[str]:
    """The quantizations GGUF files are named for (Q4_K_M, Q8_0, ...), as the files spell them."""
    found = {m.group(1).upper() for n in names for m in [QUANT.search(Path(_stem(n)).stem)] if m}
    return sorted(found)


def choose_gguf(repo_id: str, names: list[str], quant: str | None, known: dict[str, str]) -> list[str]:
    """The GGUF file (all shards of a split one) for `quant`; a listing of the choices when unclear."""
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "mmproj" not in n.lower()]
    if not ggufs:
        raise ModelNotFound(
            f"{repo_id} holds no .gguf file: for a safetensors repository use --engine transformers (or vllm)"
        )
    if quant and known.get(quant.upper()) in ggufs:
        wanted = [known[quant.upper()]]
    elif quant:
        token = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9_])")
        wanted = [n for n in ggufs if token.search(Path(_stem(n)).name.lower())]
        if not wanted:
            raise ModelNotFound(
                f"{repo_id} has no {quant.upper()} GGUF file; its quantizations: "
                f"{', '.join(quantizations(ggufs)) or 'none recognised'} (files: {', '.join(ggufs)})"
            )
    else:
        wanted = ggufs
    models = sorted({_stem(n) for n in wanted})
    if len(models) > 1:
        raise ModelNotFound(
            f"{repo_id} holds several GGUF files; choose one with `{repo_id}:QUANT` or --quantization "
            f"({', '.join(quantizations(wanted)) or 'see the files'}): {', '.join(models)}"
        )
    return sorted(n for n in ggufs if _stem(n) == models[0])


def choose_hf(repo_id: str, names: list[str]) -> list[str]:
    """The files transformers and vLLM load: config, tokenizer, and safetensors (else .bin) weights."""
    top = [n for n in names if "/" not in n]
    if "config.json" not in top:
        raise ModelNotFound(
            f"{repo_id} has no config.json: not a transformers model"
            + (
                " (it holds GGUF files: use --engine llamacpp)"
                if any(n.endswith(".gguf") for n in names)
                else ""
            )
        )
    weights = [n for n in top if n.endswith(".safetensors")] or [
        n for n in top if n.startswith("pytorch_model") and n.endswith(".bin")
    ]
    if not weights:
        raise ModelNotFound(f"{repo_id} has config.json but no .safetensors or pytorch_model*.bin weights")
    return sorted({n for n in top if n.endswith(HF_SUFFIXES)} | set(weights))


def check_disk(need: int, where: Path, what: str) -> None:
    """PullFailed when `need` bytes (plus a margin) do not fit in the file system holding `where`."""
    if need <= 0:
        return
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need + DISK_MARGIN > free:
        raise PullFailed(
            f"not enough disk to {what}: it needs {need / GIB:.2f} GiB in {where} and {free / GIB:.2f} GiB "
            "are free. Free some space, or point HF_HOME (hub) or EASLLM_HOME (object storage) at a "
            "larger disk"
        )


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")
