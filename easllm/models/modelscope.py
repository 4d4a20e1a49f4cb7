"""Pulls from ModelScope (`--model-source modelscope`) through its own client, an optional extra.

The `modelscope` package lists a repository's files with their sizes and SHA-256, downloads into
its cache (MODELSCOPE_CACHE, default ~/.cache/modelscope) and checks each file's SHA-256 itself;
MODELSCOPE_ENDPOINT points it at another endpoint, MODELSCOPE_API_TOKEN carries a token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from easllm.errors import ModelNotFound, PullFailed
from easllm.models.plan import RemoteFile, RemotePlan, check_disk, choose_gguf, choose_hf


def _client() -> Any:
    try:
        import modelscope  # noqa: F401
        from modelscope.hub.api import HubApi
    except ImportError as exc:
        raise PullFailed(
            "--model-source modelscope needs the ModelScope client: pip install 'easllm[modelscope]'"
        ) from exc
    return HubApi()


def plan_modelscope(repo_id: str, fmt: str | None, quant: str | None, known: dict[str, str]) -> RemotePlan:
    api = _client()
    try:
        listing = api.get_model_files(repo_id, recursive=True)
    except Exception as exc:
        raise PullFailed(
            f"{repo_id} on ModelScope: {type(exc).__name__}: {exc} (a gated model needs "
            "MODELSCOPE_API_TOKEN; another endpoint: MODELSCOPE_ENDPOINT)"
        ) from exc
    files = {
        e["Path"]: RemoteFile(e["Path"], e.get("Size"), e.get("Sha256") or None)
        for e in listing
        if e.get("Type", "blob") == "blob"
    }
    names = sorted(files)
    if fmt is None:
        fmt = "gguf" if any(n.lower().endswith(".gguf") for n in names) else "hf"
    chosen = choose_gguf(repo_id, names, quant, known) if fmt == "gguf" else choose_hf(repo_id, names)
    return RemotePlan("modelscope", repo_id, None, fmt, [files[n] for n in chosen])


def pull_modelscope(plan: RemotePlan) -> Path:
    _client()
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope.utils.file_utils import get_modelscope_cache_dir

    check_disk(plan.total_bytes, Path(get_modelscope_cache_dir()), f"pull {plan.repo_id} from ModelScope")
    try:
        folder = Path(snapshot_download(plan.repo_id, allow_patterns=[f.name for f in plan.files]))
    except Exception as exc:
        raise PullFailed(f"{plan.repo_id} on ModelScope: {type(exc).__name__}: {exc}") from exc
    missing = [f.name for f in plan.files if not (folder / f.name).is_file()]
    if missing:
        raise ModelNotFound(f"{plan.repo_id} on ModelScope: not downloaded: {', '.join(missing)}")
    return folder / plan.files[0].name if plan.format == "gguf" else folder
