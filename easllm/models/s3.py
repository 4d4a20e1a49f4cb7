"""Pulls from S3-compatible object storage (AWS S3, Alibaba OSS, MinIO): `s3://bucket/prefix/`.

boto3 reads the endpoint (AWS_ENDPOINT_URL, or AWS_ENDPOINT_URL_S3) and the credentials
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) itself. Each object is written to
`<name>.partial`, resumed from there with a Range request pinned to the object's ETag (If-Match),
checked (size; MD5 where the ETag is one), and only then renamed; a folder lock makes concurrent
pulls of one prefix wait for the first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from easllm.errors import ChecksumMismatch, ModelNotFound, PullFailed
from easllm.models.lock import model_lock
from easllm.models.plan import RemoteFile, RemotePlan, check_disk, file_digest

if TYPE_CHECKING:  # boto3-stubs[s3], in the `test` extra
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectRequestTypeDef

log = logging.getLogger(__name__)
MAX_OBJECTS = 10_000
CHUNK = 1 << 20
DONE = ".easllm-pulled.json"  # written last: the folder holds the whole prefix, verified


def parse_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ModelNotFound(f"{url!r} is not an s3://bucket/prefix/ URL")
    prefix = parsed.path.lstrip("/")
    return parsed.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/"


def s3_target(url: str, home: Path) -> Path:
    bucket, prefix = parse_s3_url(url)
    return home / "models" / "s3" / bucket / prefix.rstrip("/")


def cached_s3(url: str, home: Path) -> Path | None:
    target = s3_target(url, home)
    return target if (target / DONE).is_file() else None


def _client() -> S3Client:
    try:
        import boto3
    except ImportError as exc:
        raise PullFailed("s3:// models need boto3: pip install 'easllm[s3]'") from exc
    return boto3.client("s3")


def plan_s3(url: str) -> RemotePlan:
    bucket, prefix = parse_s3_url(url)
    client = _client()
    files = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                if name and not name.endswith("/"):
                    files.append(RemoteFile(name, obj["Size"], None, obj["ETag"].strip('"')))
                if len(files) > MAX_OBJECTS:
                    raise PullFailed(f"{url} holds over {MAX_OBJECTS} objects: name the model's own prefix")
    except PullFailed:
        raise
    except Exception as exc:
        raise _s3_error(url, exc) from exc
    if not files:
        raise ModelNotFound(f"{url}: no objects under this prefix (check the bucket, prefix and endpoint)")
    names = [f.name for f in files]
    fmt = "hf" if "config.json" in names else "gguf"
    if fmt == "gguf" and not any(n.endswith(".gguf") for n in names):
        raise ModelNotFound(f"{url} holds neither config.json nor a .gguf file: {', '.join(names[:10])}")
    return RemotePlan("s3", url, None, fmt, sorted(files, key=lambda f: f.name))


def pull_s3(plan: RemotePlan, home: Path, on_bytes: Callable[[int], None] | None = None) -> Path:
    bucket, prefix = parse_s3_url(plan.repo_id)
    target = s3_target(plan.repo_id, home)
    report = on_bytes or (lambda n: None)
    with model_lock(target, log.info):
        done = target / DONE
        if done.is_file() and json.loads(done.read_text()).get("files") == _manifest(plan):
            return target
        done.unlink(missing_ok=True)
        need = sum((f.size or 0) - _have(target / f.name) for f in plan.files if not _complete(target, f))
        check_disk(need, target, f"pull {plan.repo_id}")
        client = _client()
        for f in plan.files:
            if not _complete(target, f):
                _download(client, bucket, prefix + f.name, f, target / f.name, report)
        done.write_text(json.dumps({"url": plan.repo_id, "files": _manifest(plan)}))
    return target


def _manifest(plan: RemotePlan) -> list[list[object]]:
    return [[f.name, f.size, f.etag] for f in plan.files]


def _etag_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".etag")


def _complete(target: Path, f: RemoteFile) -> bool:
    dest = target / f.name
    tag = _etag_file(dest)
    return dest.is_file() and tag.is_file() and tag.read_text() == f.etag and dest.stat().st_size == f.size


def _have(path: Path) -> int:
    partial = path.with_name(path.name + ".partial")
    return partial.stat().st_size if partial.is_file() else 0


def _download(
    client: S3Client, bucket: str, key: str, f: RemoteFile, dest: Path, report: Callable[[int], None]
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    tag = _etag_file(dest)
    if partial.exists() and (not tag.is_file() or tag.read_text() != f.etag):
        partial.unlink()  # a different version of the object: start over
    tag.write_text(f.etag or "")
    have = _have(dest)
    if have > (f.size or 0):
        partial.unlink()
        have = 0
    if have < (f.size or 0):
        args: GetObjectRequestTypeDef = {"Bucket": bucket, "Key": key, "IfMatch": f'"{f.etag}"'}
        if have:
            args["Range"] = f"bytes={have}-"
        try:
            body = client.get_object(**args)["Body"]
        except Exception as exc:
            raise _s3_error(f"s3://{bucket}/{key}", exc) from exc
        with partial.open("ab") as out:
            while block := body.read(CHUNK):
                out.write(block)
                report(len(block))
    _check(partial, f, key)
    partial.replace(dest)


def _check(partial: Path, f: RemoteFile, key: str) -> None:
    size = partial.stat().st_size
    problem = f"{size} bytes, the object has {f.size}" if size != f.size else ""
    if not problem and f.etag and "-" not in f.etag:  # a single-part upload's ETag is its MD5
        md5 = file_digest(partial, "md5")
        problem = f"MD5 {md5}, the object's ETag is {f.etag}" if md5 != f.etag else ""
    if problem:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{key}: downloaded {problem}; the partial file was removed, pull again")


def _s3_error(url: str, exc: Exception) -> Exception:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
    if code in ("NoSuchBucket", "NoSuchKey", "404"):
        return ModelNotFound(f"{url}: {code}")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return PullFailed(
            f"{url}: {code}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this bucket"
        )
    if code in ("PreconditionFailed", "412"):
        return PullFailed(f"{url}: the object changed while it was pulled; pull again")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return PullFailed(f"{url}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if type(exc).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return PullFailed(f"{url}: cannot reach the object store ({exc}); check AWS_ENDPOINT_URL")
    return PullFailed(f"{url}: {type(exc).__name__}: {exc}")
