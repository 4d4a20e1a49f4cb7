"""Pulls from the Hugging Face Hub, or the mirror in HF_ENDPOINT, into its standard cache.

huggingface_hub does the transfer: HF_TOKEN, HF_HUB_OFFLINE and HF_HOME are its own; it locks each
file, writes to a temporary `.incomplete` file renamed only when complete, and retries a broken
transfer from where it stopped (HTTP Range). Here: which files a model needs, whether they fit on
the disk, their SHA-256 against the hub's, and errors that say what to do.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from easllm.errors import ChecksumMismatch, ModelNotFound, PullFailed
from easllm.models.plan import RemoteFile, RemotePlan, check_disk, choose_gguf, choose_hf, sha256_of

log = logging.getLogger(__name__)
LISTING_TIMEOUT = 30.0  # seconds for the hub's file listing


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_dir(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def plan_hub(
    repo_id: str, fmt: str | None, quant: str | None, known: dict[str, str], revision: str | None = None
) -> RemotePlan:
    """The files `repo_id` needs for `fmt` (gguf | hf | None: what the repo holds), from the hub's listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=LISTING_TIMEOUT)
    except OfflineModeIsEnabled as exc:
        raise _offline(repo_id, "HF_HUB_OFFLINE is set") from exc
    except Exception as exc:
        raise hub_error(repo_id, exc) from exc
    files = {
        s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    names = sorted(files)
    if fmt is None:
        fmt = "gguf" if any(n.lower().endswith(".gguf") for n in names) else "hf"
    chosen = choose_gguf(repo_id, names, quant, known) if fmt == "gguf" else choose_hf(repo_id, names)
    # downloads ask for `revision` (main), not the commit, so that the cache records refs/main for offline use
    return RemotePlan("huggingface", repo_id, revision, fmt, [files[n] for n in chosen])


def pull_hub(
    plan: RemotePlan, verified_dir: Path, on_bytes: Callable[[int], None] | None = None, quiet: bool = False
) -> Path:
    """Download what `plan` names (reusing the cache); the GGUF file or the snapshot folder."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    missing = [
        f
        for f in plan.files
        if not isinstance(try_to_load_from_cache(plan.repo_id, f.name, revision=plan.revision), str)
    ]
    check_disk(sum(f.size or 0 for f in missing), hub_cache_dir(), f"pull {plan.repo_id}")
    tqdm_class = _reporting_tqdm(on_bytes, quiet)
    paths = []
    for f in plan.files:
        try:
            path = Path(hf_hub_download(plan.repo_id, f.name, revision=plan.revision, tqdm_class=tqdm_class))
        except Exception as exc:
            raise hub_error(plan.repo_id, exc) from exc
        _verify(plan.repo_id, f, path, verified_dir)
        paths.append(path)
    return paths[0] if plan.format == "gguf" else paths[0].parent


def cached_hub(repo_id: str, fmt: str | None, quant: str | None, known: dict[str, str]) -> Path | None:
    """The model from the local cache alone (no network), or None when it is not all there."""
    snapshot = _cached_snapshot(repo_id)
    if snapshot is None:
        return None
    names = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    has_gguf = any(n.lower().endswith(".gguf") for n in names)
    if fmt == "gguf" or (fmt is None and has_gguf):
        try:
            chosen = choose_gguf(repo_id, names, quant, known)
        except ModelNotFound:
            return None
        return snapshot / chosen[0]
    if not (snapshot / "config.json").is_file() or not any(n.endswith(".safetensors") for n in names):
        return None
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():  # a sharded model: every shard, or it is not all there
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if not all((snapshot / s).is_file() for s in shards):
            return None
    return snapshot


def _cached_snapshot(repo_id: str) -> Path | None:
    repo_dir = repo_cache_dir(repo_id)
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def _verify(repo_id: str, f: RemoteFile, path: Path, verified_dir: Path) -> None:
    """Compare a large file's SHA-256 with the hub's once; a mismatch removes the file from the cache."""
    if not f.sha256:
        return  # small git files: the hub gives no SHA-256 (huggingface_hub checked their size)
    marker = verified_dir / f.sha256
    if marker.exists():
        return
    actual = sha256_of(path)
    if actual != f.sha256:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{f.name} from {repo_id}: SHA-256 {actual}, the hub publishes {f.sha256}; the file was removed "
            "from the cache. Pull again; if it repeats, the mirror or proxy (HF_ENDPOINT) serves a bad copy"
        )
    verified_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _reporting_tqdm(on_bytes: Callable[[int], None] | None, quiet: bool) -> type | None:
    """huggingface_hub's own progress bar, also telling `on_bytes` each chunk written."""
    if on_bytes is None and not quiet:
        return None
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    report = on_bytes or (lambda n: None)

    class ReportingTqdm(hub_tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if quiet:
                kwargs["disable"] = True
            hub_tqdm.__init__(self, *args, **kwargs)  # named, not super(): mypy then knows it is the hub's

        def update(self, n: float | None = 1) -> bool | None:
            report(int(n or 0))
            shown: bool | None = super().update(n)
            return shown

    return ReportingTqdm


def _offline(repo_id: str, why: str) -> ModelNotFound:
    return ModelNotFound(
        f"{repo_id} is not on this machine ({repo_cache_dir(repo_id)}) and {why}. On a machine "
        f"that reaches the hub run `easllm pull {repo_id}` (files go to {hub_cache_dir()}; copy that folder "
        "here, or set HF_HOME to where it is), or unset HF_HUB_OFFLINE, or set HF_ENDPOINT to a mirror"
    )


def hub_error(repo_id: str, exc: Exception) -> Exception:
    """A huggingface_hub error as one a user can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (ModelNotFound, ChecksumMismatch)):
        return exc
    if isinstance(exc, GatedRepoError):
        return PullFailed(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} with your account, "
            "then pass a token: `HF_TOKEN=hf_... easllm pull ...` or `hf auth login` (the console passes "
            "its own environment to replicas)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return PullFailed(
            f"{repo_id}: no such repository on the hub, or it is private or gated and no valid token was "
            "sent (set HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return PullFailed(f"{repo_id}: no such revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return PullFailed(f"{repo_id}: a file the listing named is missing on the hub: {exc}")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return _offline(repo_id, "the hub cannot be reached (or HF_HUB_OFFLINE is set)")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return ChecksumMismatch(f"{repo_id}: {exc}")
    if _is_connection_error(exc):
        return _offline(repo_id, f"the hub cannot be reached ({type(exc).__name__}: {exc})")
    return PullFailed(f"{repo_id}: {type(exc).__name__}: {exc}")


def _is_connection_error(exc: BaseException | None) -> bool:
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2 speaks httpx2, 1.x httpx
        with contextlib.suppress(ImportError):
            kinds.append(importlib.import_module(module).TransportError)
    while exc is not None:
        if isinstance(exc, tuple(kinds)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
