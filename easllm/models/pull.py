"""Models fetched on demand: a catalog name, `ORG/REPO[:QUANT]` or `s3://bucket/prefix/` -> local files.

    ref = remote_ref("qwen2-7b", engine=None, quantization=None, source="huggingface")
    pulled = local_pull(ref, home) or pull(ref, home, progress)

Which files: a catalog name on llama.cpp (the default) is its GGUF build at Q4_K_M unless
`--quantization` names another; on transformers or vLLM its safetensors repository. A pulled model
is recorded in EASLLM_HOME/pulled/, so later starts need no network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from easllm.errors import ModelNotFound
from easllm.models.bundled import Progress
from easllm.models.catalog import DEFAULT_QUANT, CatalogEntry, catalog_entry
from easllm.models.plan import RemotePlan

log = logging.getLogger(__name__)
SOURCES = ("huggingface", "modelscope")
REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?::(?P<quant>[\w.-]{1,32}))?$")
QUANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
HF_ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user wrote
    name: str  # what the service calls the model
    source: str  # huggingface | modelscope | s3
    repo_id: str  # a hub repository, or the s3:// URL
    format: str | None  # gguf | hf | None: what the repository holds
    quant: str | None
    known_files: dict[str, str] = field(default_factory=dict)  # quantization -> GGUF file (catalog)
    catalog: CatalogEntry | None = None

    @property
    def key(self) -> str:
        raw = f"{self.source}--{self.repo_id}--{self.format or 'auto'}--{self.quant or ''}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


@dataclass(frozen=True)
class PulledModel:
    name: str
    path: Path  # the GGUF file (first shard) or the Hugging Face folder
    format: str  # gguf | hf
    size_bytes: int
    source: str
    repo_id: str


def remote_ref(
    spec: str,
    engine: str | None = None,
    quantization: str | None = None,
    source: str = "huggingface",
    gpu: bool = False,
) -> ModelRef | None:
    """What to fetch for `spec`, or None when it names nothing remote (a local path, a bundled name).

    A catalog name with no engine given: its GGUF build (llama.cpp) on a CPU, its safetensors
    repository when it runs on a GPU (`gpu`)."""
    if quantization is not None and not QUANT_NAME.match(quantization):
        raise ModelNotFound(f"--quantization {quantization!r}: letters, digits, _ . - (at most 32)")
    if source not in SOURCES:
        raise ModelNotFound(f"--model-source {source!r}: one of {', '.join(SOURCES)}")
    if spec.startswith("s3://"):
        return ModelRef(spec, spec.rstrip("/").rsplit("/", 1)[-1], "s3", spec, None, None)
    entry = catalog_entry(spec)
    if entry is not None:
        if engine is None and gpu and not quantization:
            engine = "transformers"
        return _catalog_ref(spec, entry, engine, quantization, source)
    match = REPO_SPEC.match(spec)
    if match is None or Path(spec).expanduser().exists():
        return None
    quant = (quantization or match["quant"] or "").upper() or None
    fmt = "hf" if engine in HF_ENGINES else ("gguf" if quant or engine == "llamacpp" else None)
    repo = match["repo"]
    return ModelRef(spec, repo.rsplit("/", 1)[-1].lower(), source, repo, fmt, quant)


def _catalog_ref(
    spec: str, entry: CatalogEntry, engine: str | None, quantization: str | None, source: str
) -> ModelRef:
    gguf = engine not in HF_ENGINES
    if gguf and not entry.gguf_repo:
        if engine == "llamacpp" or quantization:
            raise ModelNotFound(
                f"the catalog knows no GGUF build of {entry.name}: run it with --engine transformers "
                f"(or vllm), or name a GGUF repository: --model-path ORG/REPO-GGUF:{DEFAULT_QUANT}"
            )
        gguf = False
    if not gguf:
        repo = entry.ms_repo_id if source == "modelscope" else entry.repo_id
        return ModelRef(spec, entry.name, source, repo, "hf", None, catalog=entry)
    quant = (quantization or DEFAULT_QUANT).upper()
    return ModelRef(spec, entry.name, source, entry.gguf_repo, "gguf", quant, entry.gguf_files, entry)


def download_dir(ref: ModelRef, home: Path) -> Path:
    """Where `ref`'s files will be written (for the disk check before a deploy)."""
    if ref.source == "s3":
        from easllm.models.s3 import s3_target

        return s3_target(ref.repo_id, home)
    if ref.source == "modelscope":
        return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")
    from easllm.models.hub import hub_cache_dir

    return hub_cache_dir()


def plan(ref: ModelRef) -> RemotePlan:
    """The files `ref` needs and their sizes, asked of its source (network)."""
    if ref.source == "s3":
        from easllm.models.s3 import plan_s3

        return plan_s3(ref.repo_id)
    if ref.source == "modelscope":
        from easllm.models.modelscope import plan_modelscope

        return plan_modelscope(ref.repo_id, ref.format, ref.quant, ref.known_files)
    from easllm.models.hub import plan_hub

    return plan_hub(ref.repo_id, ref.format, ref.quant, ref.known_files)


def pull(
    ref: ModelRef,
    home: Path,
    progress: Progress = log.info,
    on_bytes: Callable[[int], None] | None = None,
    quiet: bool = False,
    remote: RemotePlan | None = None,
) -> PulledModel:
    """Fetch `ref` (what is already cached is reused) and record it; `on_bytes` hears each chunk."""
    remote = remote or plan(ref)
    progress(
        f"pulling {ref.repo_id} from {ref.source}: {len(remote.files)} file(s), "
        f"{remote.total_bytes / (1 << 30):.2f} GiB"
    )
    if remote.source == "s3":
        from easllm.models.s3 import pull_s3

        path = pull_s3(remote, home, on_bytes)
    elif remote.source == "modelscope":
        from easllm.models.modelscope import pull_modelscope

        path = pull_modelscope(remote)
    else:
        from easllm.models.hub import pull_hub

        path = pull_hub(remote, home / "verified", on_bytes, quiet)
    path, fmt = _local_format(path) if remote.source == "s3" else (path, remote.format)
    pulled = PulledModel(ref.name, path, fmt, remote.total_bytes, ref.source, ref.repo_id)
    _record(ref, pulled, home)
    progress(f"pulled {ref.repo_id}: {pulled.path}")
    return pulled


def local_pull(ref: ModelRef, home: Path) -> PulledModel | None:
    """`ref` from this machine alone: an earlier pull, or the user's own Hugging Face cache."""
    record = _read(_records(home) / f"{ref.key}.json")
    if record is not None:
        return record
    if ref.catalog is not None and ref.format == "hf":
        local = home / "models" / ref.catalog.name
        if (local / "config.json").is_file():
            return PulledModel(ref.name, local, "hf", 0, "local", str(local))
    if ref.source == "huggingface":
        from easllm.models.hub import cached_hub

        path = cached_hub(ref.repo_id, ref.format, ref.quant, ref.known_files)
        if path is not None:
            fmt = "gguf" if path.suffix == ".gguf" else "hf"
            return PulledModel(ref.name, path, fmt, 0, ref.source, ref.repo_id)
    if ref.source == "s3":
        from easllm.models.s3 import cached_s3

        folder = cached_s3(ref.repo_id, home)
        if folder is not None:
            path, fmt = _local_format(folder)
            return PulledModel(ref.name, path, fmt, 0, "s3", ref.repo_id)
    return None


def pulled_models(home: Path) -> list[PulledModel]:
    """Every model pulled to this machine that is still there, for `easllm models`."""
    return [m for r in sorted(_records(home).glob("*.json")) if (m := _read(r)) is not None]


def _read(record: Path) -> PulledModel | None:
    try:
        data = json.loads(record.read_text())
        data.pop("pulled_at", None)
        model = PulledModel(**{**data, "path": Path(data["path"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return model if model.path.exists() else None


def _local_format(folder: Path) -> tuple[Path, str]:
    if (folder / "config.json").is_file():
        return folder, "hf"
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFound(f"{folder} holds neither config.json nor a .gguf file")
    return ggufs[0], "gguf"


def _records(home: Path) -> Path:
    return home / "pulled"


def _record(ref: ModelRef, pulled: PulledModel, home: Path) -> None:
    records = _records(home)
    records.mkdir(parents=True, exist_ok=True)
    tmp = records / f"{ref.key}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**asdict(pulled), "path": str(pulled.path), "pulled_at": time.time()}))
    tmp.replace(records / f"{ref.key}.json")
