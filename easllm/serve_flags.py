"""The flags of `easllm serve` (and `--quantization`/`--model-source` of `easllm pull`).

One module for the CLI, the console (which checks a spec's extra serve flags against them) and the
Ray replica (which builds a service's app from them): none of them imports another to get these.
`serve_config.py` turns the parsed flags into the config dataclasses; `flag_values.py` checks values.
Each default is read from its config dataclass, so a default is written once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from easllm.config import EngineConfig, KnowledgeConfig, LimitsConfig, SamplingDefaults, ServerConfig
from easllm.engine.factory import ENGINES
from easllm.flag_values import embedding_model, host_list, quantization, ranged, replica_name
from easllm.logs import LOG_FORMATS, LOG_LEVELS
from easllm.tools.formats import FORMATS


def add_pull_flags(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--quantization",
        type=quantization,
        default=None,
        help="GGUF quantization to fetch, e.g. Q4_K_M, Q5_K_M, Q8_0 (default: Q4_K_M for catalog names; "
        "a repository with one GGUF file needs none)",
    )
    p.add_argument(
        "--model-source",
        choices=("huggingface", "modelscope"),
        default=EngineConfig.model_source,
        help="where named models are fetched from: the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN) or "
        "ModelScope (default %(default)s)",
    )


def add_allowed_hosts(p: argparse._ActionsContainer, who: str, also: str = "") -> None:
    """`--allowed-hosts` of `easllm serve` and of the console: a list of names once parsed."""
    p.add_argument(
        "--allowed-hosts",
        action="extend",
        type=host_list,
        default=[],
        metavar="HOST",
        help=f"a Host name a loopback-bound {who} answers besides localhost, 127.0.0.1, [::1]{also} "
        "(behind a proxy); repeatable or comma-separated; * turns the check off",
    )


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from easllm.rag.cli import KB_DATABASE_ENV, database_url_arg

    m = p.add_argument_group("model and engine")
    m.add_argument(
        "--model-path",
        default=EngineConfig.model_path,
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
        type=ranged(int, 16),
        default=EngineConfig.ctx_size,
        help="context window of one sequence in tokens, prompt plus answer (capped at the model's; "
        "default %(default)s)",
    )
    m.add_argument("--threads", type=ranged(int, 1), default=None, help="CPU threads (default: all)")
    m.add_argument(
        "--max-queue",
        type=ranged(int, 1),
        default=EngineConfig.max_queue,
        help="requests waiting for the engine before 503 (default %(default)s)",
    )
    m.add_argument(
        "--max-batch",
        "--max-num-seqs",
        dest="max_batch",
        type=ranged(int, 1),
        default=None,
        help="sequences decoded together, each with its own context (default 16; vLLM: 256)",
    )
    m.add_argument(
        "--max-batch-tokens",
        type=ranged(int, 1),
        default=EngineConfig.max_batch_tokens,
        help="llama.cpp: tokens per forward pass, decode tokens plus prompt chunks (default %(default)s)",
    )
    m.add_argument(
        "--kv-size",
        type=ranged(int, 16),
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
        default=EngineConfig.omp_wait_policy,
        help="llama.cpp: OpenMP threads at barriers; auto: OpenMP's own default (or OMP_WAIT_POLICY), "
        "passive: on a machine shared with other busy processes",
    )
    m.add_argument(
        "--tensor-parallel-size",
        type=ranged(int, 1),
        default=EngineConfig.tensor_parallel_size,
        help="vLLM: GPUs one model is split over (default %(default)s)",
    )
    m.add_argument(
        "--gpu-memory-utilization",
        type=ranged(float, 0, 1, low_open=True),
        default=EngineConfig.gpu_memory_utilization,
        help="vLLM: share of each GPU's memory for weights and KV cache (default %(default)s)",
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default=ServerConfig.host, help="bind address (default %(default)s)")
    s.add_argument(
        "--port", type=ranged(int, 1, 65535), default=ServerConfig.port, help="port (default %(default)s)"
    )
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
    s.add_argument(
        "--service-name",
        default=ServerConfig.service_name,
        help="name of this service (logs, history export)",
    )
    s.add_argument(
        "--replica-name",
        type=replica_name,
        default=None,
        help="this process among the service's replicas: its history export files carry it "
        "(letters, digits, _ and -, up to 64; the console sets it)",
    )
    s.add_argument(
        "--root-path",
        default=ServerConfig.root_path,
        help="path prefix a proxy serves this service under (e.g. /api/predict/NAME behind the console)",
    )
    ui = s.add_mutually_exclusive_group()
    ui.add_argument("--api-only", action="store_true", help="serve only the API, no WebUI")
    ui.add_argument("--no-api", action="store_true", help="serve only the WebUI, no API")
    s.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=ServerConfig.log_level)
    s.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=ServerConfig.log_format,
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
        type=ranged(int, 1),
        default=SamplingDefaults.max_new_tokens,
        help="default and upper limit of new tokens per answer (default %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=ranged(float, 0, 2),
        default=SamplingDefaults.temperature,
        help="0 = greedy (default %(default)s)",
    )
    g.add_argument(
        "--max_round",
        "--max-round",
        dest="max_round",
        type=ranged(int, 0),
        default=ServerConfig.max_round,
        help="history rounds kept in the prompt (default %(default)s)",
    )
    g.add_argument(
        "--top_k", "--top-k", dest="top_k", type=ranged(int, 0), default=None, help="top-k sampling"
    )
    g.add_argument(
        "--top_p",
        "--top-p",
        dest="top_p",
        type=ranged(float, 0, 1, low_open=True),
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
        type=embedding_model,
        default=ServerConfig.embedding_model,
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
        type=ranged(int, 50),
        default=KnowledgeConfig.chunk_size,
        help="characters per knowledge-base chunk (default %(default)s)",
    )
    k.add_argument(
        "--kb-chunk-overlap",
        type=ranged(int, 0),
        default=KnowledgeConfig.chunk_overlap,
        help="characters neighbouring chunks share; less than the chunk size (default %(default)s)",
    )
    k.add_argument(
        "--kb-top-k",
        type=ranged(int, 1, 50),
        default=KnowledgeConfig.top_k,
        help="chunks given to the model per langchain question (default %(default)s)",
    )
    k.add_argument(
        "--kb-score-threshold",
        type=ranged(float, -1, 1),
        default=KnowledgeConfig.score_threshold,
        help="chunks whose cosine score is lower are not used (default %(default)s)",
    )
    k.add_argument(
        "--kb-retrieval",
        choices=["hybrid", "vector", "keyword"],
        default=KnowledgeConfig.retrieval,
        help="how chunks are found: BM25 keywords and vectors fused by rank, or one of the two "
        "(default %(default)s)",
    )
    k.add_argument(
        "--kb-max-file-mb",
        type=ranged(float, 0, low_open=True),
        default=KnowledgeConfig.max_file_mb,
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
        type=ranged(float, 0, low_open=True),
        default=ServerConfig.export_interval,
        help="seconds per export period (default %(default)s)",
    )
    lim = p.add_argument_group("limits and security (beyond a limit: a clear 413 or 503, never a 500)")
    lim.add_argument(
        "--max-body-mb",
        type=ranged(float, 0, low_open=True),
        default=LimitsConfig.max_body_mb,
        help="largest HTTP request body and WebSocket message, in MB (knowledge uploads: "
        "--kb-max-file-mb per file; default %(default)s)",
    )
    lim.add_argument(
        "--max-upload-files",
        type=ranged(int, 1),
        default=LimitsConfig.max_upload_files,
        help="files per knowledge-base upload (default %(default)s)",
    )
    lim.add_argument(
        "--max-connections",
        type=ranged(int, 1),
        default=LimitsConfig.max_connections,
        help="HTTP requests in progress plus open WebSockets; one more gets 503 with Retry-After "
        "(probes excepted; default %(default)s)",
    )
    lim.add_argument(
        "--ws-max-pending",
        type=ranged(int, 1),
        default=LimitsConfig.ws_max_pending,
        help="messages one WebSocket may send ahead of its answers; one more closes it with 1008 "
        "(default %(default)s)",
    )
    lim.add_argument(
        "--abuse-rate",
        type=ranged(float, 0),
        default=LimitsConfig.abuse_rate,
        help="refused requests (4xx but 401 and 429) a client address may make a second, after "
        "--abuse-burst; beyond it its requests are delayed, then 429 with Retry-After "
        "(0 disables; default %(default)s)",
    )
    lim.add_argument(
        "--abuse-burst",
        type=ranged(int, 0),
        default=LimitsConfig.abuse_burst,
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
    add_allowed_hosts(lim, "server")


def serve_parser() -> argparse.ArgumentParser:
    """A parser of `easllm serve`'s flags alone (for a service built in process, as on Ray)."""
    parser = argparse.ArgumentParser(prog="easllm serve")
    add_serve_flags(parser)
    return parser
