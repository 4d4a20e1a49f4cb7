"""The flags of `easllm serve` and how they become the config dataclasses, one to one.

One module for the CLI, the console (which checks a spec's extra serve flags against them) and the
Ray replica (which builds a service's app from them): none of them imports another to get these.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path

from easllm.config import (
    EngineConfig,
    KnowledgeConfig,
    LimitsConfig,
    SamplingDefaults,
    ServerConfig,
    default_max_batch,
)
from easllm.engine.factory import ENGINES
from easllm.logs import LOG_FORMATS
from easllm.tools.formats import FORMATS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REPLICA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
EMBEDDING_MODELS = ("multilingual-e5-small", "all-minilm-l6-v2")


def _ranged(
    kind: type[float] | type[int], low: float | None = None, high: float | None = None, low_open: bool = False
) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        try:
            value: float | int = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from exc
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = f"> {low}" if low_open else f">= {low}"
            rng = f"{lo} and <= {high}" if high is not None else lo
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {rng})")
        return value

    return parse


def _replica_name(text: str) -> str:
    if not REPLICA_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r}: use 1-64 letters, digits, _ and - (it goes into file names)"
        )
    return text


def _embedding_model(text: str) -> str:
    from easllm.rag.embedder import embedder_name

    try:
        return embedder_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_pull_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--quantization",
        type=_quantization,
        default=None,
        help="GGUF quantization to fetch, e.g. Q4_K_M, Q5_K_M, Q8_0 (default: Q4_K_M for catalog names; "
        "a repository with one GGUF file needs none)",
    )
    p.add_argument(
        "--model-source",
        choices=("huggingface", "modelscope"),
        default="huggingface",
        help="where named models are fetched from: the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN) or "
        "ModelScope (default %(default)s)",
    )


def _quantization(text: str) -> str:
    from easllm.models.pull import QUANT_NAME

    if not QUANT_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, _ . - (at most 32), e.g. Q4_K_M")
    return text.upper()


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from easllm.rag.cli import KB_DATABASE_ENV, database_url_arg

    m = p.add_argument_group("model and engine")
    m.add_argument(
        "--model-path",
        default="qwen2.5-0.5b-instruct",
        help="bundled name (qwen2.5-0.5b-instruct, gemma3-270m), catalog name, hub repository "
        "ORG/REPO[:QUANT], s3://bucket/prefix/, HF directory with config.json, or .gguf file; a "
        "remote model is pulled first when absent (default: %(default)s)",
    )
    add_pull_flags(m)
    m.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="inference engine; default: llamacpp for GGUF, transformers for HF directories",
    )
    m.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    m.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="weights precision for transformers (default: bf16 where the device supports it)",
    )
    m.add_argument(
        "--ctx-size",
        type=_ranged(int, 16),
        default=8192,
        help="context window of one sequence in tokens, prompt plus answer (capped at the model's; "
        "default %(default)s)",
    )
    m.add_argument("--threads", type=_ranged(int, 1), default=None, help="CPU threads (default: all)")
    m.add_argument(
        "--max-queue",
        type=_ranged(int, 1),
        default=256,
        help="requests waiting for the engine before 503 (default %(default)s)",
    )
    m.add_argument(
        "--max-batch",
        "--max-num-seqs",
        dest="max_batch",
        type=_ranged(int, 1),
        default=None,
        help="sequences decoded together, each with its own context (default 16; vLLM: 256)",
    )
    m.add_argument(
        "--max-batch-tokens",
        type=_ranged(int, 1),
        default=512,
        help="llama.cpp: tokens per forward pass, decode tokens plus prompt chunks (default %(default)s)",
    )
    m.add_argument(
        "--kv-size",
        type=_ranged(int, 16),
        default=None,
        help="llama.cpp: KV cache in tokens, shared by all running sequences "
        "(default: ctx-size x min(4, max-batch); at least ctx-size)",
    )
    m.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="llama.cpp, vLLM: do not reuse the KV cache of earlier requests' common prefixes",
    )
    m.add_argument(
        "--omp-wait-policy",
        choices=("auto", "active", "passive"),
        default="auto",
        help="llama.cpp: OpenMP threads at barriers; auto: OpenMP's own default (or OMP_WAIT_POLICY), "
        "passive: on a machine shared with other busy processes",
    )
    m.add_argument(
        "--tensor-parallel-size",
        type=_ranged(int, 1),
        default=1,
        help="vLLM: GPUs one model is split over (default %(default)s)",
    )
    m.add_argument(
        "--gpu-memory-utilization",
        type=_ranged(float, 0, 1, low_open=True),
        default=0.9,
        help="vLLM: share of each GPU's memory for weights and KV cache (default %(default)s)",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    s.add_argument("--port", type=_ranged(int, 1, 65535), default=8000, help="port (default %(default)s)")
    s.add_argument(
        "--token",
        default=os.environ.get("EASLLM_TOKEN"),
        help="service token clients send in Authorization (default: $EASLLM_TOKEN; none = open)",
    )
    s.add_argument(
        "--token-file",
        type=Path,
        help="read the service token from this file (its first line), so it is not seen in `ps`",
    )
    s.add_argument("--service-name", default="easllm", help="name of this service (logs, history export)")
    s.add_argument(
        "--replica-name",
        type=_replica_name,
        default=None,
        help="this process among the service's replicas: its history export files carry it "
        "(letters, digits, _ and -, up to 64; the console sets it)",
    )
    s.add_argument(
        "--root-path",
        default="",
        help="path prefix a proxy serves this service under (e.g. /api/predict/NAME behind the console)",
    )
    ui = s.add_mutually_exclusive_group()
    ui.add_argument("--api-only", action="store_true", help="serve only the API, no WebUI")
    ui.add_argument("--no-api", action="store_true", help="serve only the WebUI, no API")
    s.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    s.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line for log shippers (default %(default)s)",
    )
    s.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the token (for a Prometheus on a private network)",
    )
    g = p.add_argument_group("generation defaults (requests may override)")
    g.add_argument(
        "--max-new-tokens",
        type=_ranged(int, 1),
        default=2048,
        help="default and upper limit of new tokens per answer (default %(default)s)",
    )
    g.add_argument(
        "--temperature", type=_ranged(float, 0, 2), default=0.95, help="0 = greedy (default %(default)s)"
    )
    g.add_argument(
        "--max_round",
        "--max-round",
        dest="max_round",
        type=_ranged(int, 0),
        default=5,
        help="history rounds kept in the prompt (default %(default)s)",
    )
    g.add_argument(
        "--top_k", "--top-k", dest="top_k", type=_ranged(int, 0), default=None, help="top-k sampling"
    )
    g.add_argument(
        "--top_p",
        "--top-p",
        dest="top_p",
        type=_ranged(float, 0, 1, low_open=True),
        default=None,
        help="nucleus sampling, in (0, 1]",
    )
    g.add_argument("--no-template", action="store_true", help="send prompts raw, without the chat template")
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(FORMATS),
        default=None,
        help="the model's tool-call syntax (vLLM's names); default: found in the chat template",
    )
    k = p.add_argument_group("knowledge base")
    k.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="service state (knowledge base); default: $EASLLM_HOME/services/<service-name>",
    )
    k.add_argument(
        "--embedding-model",
        type=_embedding_model,
        default="multilingual-e5-small",
        help="embedder for the knowledge base and /v1/embeddings: multilingual-e5-small, all-minilm-l6-v2 "
        "or a sentence-transformers model folder (default %(default)s)",
    )
    k.add_argument(
        "--kb-database-url",
        type=database_url_arg,
        default=os.environ.get(KB_DATABASE_ENV) or None,
        metavar="URL",
        help="database of the knowledge base, shared by the service's replicas: a SQLAlchemy URL such as "
        "postgresql+psycopg://user@host/db for replicas on several machines (default: $"
        + KB_DATABASE_ENV
        + ", else SQLite at DATA_DIR/knowledge/knowledge.db)",
    )
    k.add_argument(
        "--kb-chunk-size",
        type=_ranged(int, 50),
        default=500,
        help="characters per knowledge-base chunk (default %(default)s)",
    )
    k.add_argument(
        "--kb-chunk-overlap",
        type=_ranged(int, 0),
        default=50,
        help="characters neighbouring chunks share; less than the chunk size (default %(default)s)",
    )
    k.add_argument(
        "--kb-top-k",
        type=_ranged(int, 1, 50),
        default=3,
        help="chunks given to the model per langchain question (default %(default)s)",
    )
    k.add_argument(
        "--kb-score-threshold",
        type=_ranged(float, -1, 1),
        default=0.0,
        help="chunks whose cosine score is lower are not used (default %(default)s)",
    )
    k.add_argument(
        "--kb-retrieval",
        choices=["hybrid", "vector", "keyword"],
        default="hybrid",
        help="how chunks are found: BM25 keywords and vectors fused by rank, or one of the two "
        "(default %(default)s)",
    )
    k.add_argument(
        "--kb-max-file-mb",
        type=_ranged(float, 0, low_open=True),
        default=50.0,
        help="largest file accepted for the knowledge base, in MB (default %(default)s)",
    )
    h = p.add_argument_group("history export")
    h.add_argument(
        "--export-history-path",
        type=Path,
        default=None,
        help="directory to export conversations to, as JSON Lines per period",
    )
    h.add_argument(
        "--export-interval",
        type=_ranged(float, 0, low_open=True),
        default=3600.0,
        help="seconds per export period (default %(default)s)",
    )
    lim = p.add_argument_group("limits and security (beyond a limit: a clear 413 or 503, never a 500)")
    lim.add_argument(
        "--max-body-mb",
        type=_ranged(float, 0, low_open=True),
        default=16.0,
        help="largest HTTP request body and WebSocket message, in MB (knowledge uploads: "
        "--kb-max-file-mb per file; default %(default)s)",
    )
    lim.add_argument(
        "--max-upload-files",
        type=_ranged(int, 1),
        default=32,
        help="files per knowledge-base upload (default %(default)s)",
    )
    lim.add_argument(
        "--max-connections",
        type=_ranged(int, 1),
        default=512,
        help="HTTP requests in progress plus open WebSockets; one more gets 503 with Retry-After "
        "(probes excepted; default %(default)s)",
    )
    lim.add_argument(
        "--ws-max-pending",
        type=_ranged(int, 1),
        default=64,
        help="messages one WebSocket may send ahead of its answers; one more closes it with 1008 "
        "(default %(default)s)",
    )
    lim.add_argument(
        "--abuse-rate",
        type=_ranged(float, 0),
        default=10.0,
        help="refused requests (4xx but 401 and 429) a client address may make a second, after "
        "--abuse-burst; beyond it its requests are delayed, then 429 with Retry-After "
        "(0 disables; default %(default)s)",
    )
    lim.add_argument(
        "--abuse-burst",
        type=_ranged(int, 0),
        default=20,
        help="refused requests a client address may make at once before --abuse-rate applies "
        "(0 disables; default %(default)s)",
    )
    lim.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (e.g. https://app.example.com, or *) allowed to call the API from its "
        "pages; repeatable. Default: none, CORS closed",
    )
    lim.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="a Host name a loopback-bound server answers besides localhost, 127.0.0.1 and [::1] "
        "(behind a proxy); repeatable or comma-separated; * turns the check off",
    )


def service_token(args: argparse.Namespace) -> str | None:
    """--token, or the first line of --token-file (as llama-server's --api-key-file)."""
    if args.token_file is None:
        return args.token or None
    try:
        lines = args.token_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"easllm: --token-file {args.token_file}: cannot read it ({exc})") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise SystemExit(f"easllm: --token-file {args.token_file} is empty")
    return token


def configs_from(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    server = ServerConfig(
        host=args.host,
        port=args.port,
        token=service_token(args),
        service_name=args.service_name,
        replica_name=args.replica_name,
        root_path=args.root_path,
        api_only=args.api_only,
        no_api=args.no_api,
        max_round=args.max_round,
        no_template=args.no_template,
        tool_call_parser=args.tool_call_parser,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_public=args.metrics_public,
        export_history_path=args.export_history_path,
        export_interval=args.export_interval,
        data_dir=args.data_dir,
        embedding_model=args.embedding_model,
        knowledge=KnowledgeConfig(
            chunk_size=args.kb_chunk_size,
            chunk_overlap=args.kb_chunk_overlap,
            top_k=args.kb_top_k,
            score_threshold=args.kb_score_threshold,
            retrieval=args.kb_retrieval,
            max_file_mb=args.kb_max_file_mb,
            database_url=args.kb_database_url,
        ),
        sampling=SamplingDefaults(args.max_new_tokens, args.temperature, args.top_k, args.top_p),
        limits=LimitsConfig(
            max_body_mb=args.max_body_mb,
            max_upload_files=args.max_upload_files,
            max_connections=args.max_connections,
            ws_max_pending=args.ws_max_pending,
            abuse_rate=args.abuse_rate,
            abuse_burst=args.abuse_burst,
        ),
        cors_origins=tuple(args.cors_origin),
        allowed_hosts=tuple(h.strip() for value in args.allowed_hosts for h in value.split(",") if h.strip()),
    )
    engine = EngineConfig(
        model_path=args.model_path,
        engine=args.engine,
        quantization=args.quantization,
        model_source=args.model_source,
        cpu=args.cpu,
        precision=args.precision,
        ctx_size=args.ctx_size,
        threads=args.threads,
        max_queue=args.max_queue,
        max_batch=args.max_batch or default_max_batch(args.engine),
        max_batch_tokens=args.max_batch_tokens,
        kv_size=args.kv_size,
        prefix_cache=args.prefix_cache,
        omp_wait_policy=args.omp_wait_policy,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    return server, engine


def serve_parser() -> argparse.ArgumentParser:
    """A parser of `easllm serve`'s flags alone (for a service built in process, as on Ray)."""
    parser = argparse.ArgumentParser(prog="easllm serve")
    add_serve_flags(parser)
    return parser
