"""One flat dataclass per concern; `easllm serve` flags map onto them one to one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def easllm_home() -> Path:
    return Path(os.environ.get("EASLLM_HOME") or Path.home() / ".cache" / "easllm")


@dataclass(frozen=True)
class SamplingDefaults:
    """Server-wide defaults for fields a request leaves out."""

    max_new_tokens: int = 2048
    temperature: float = 0.95
    top_k: int | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class EngineConfig:
    model_path: str = "qwen2.5-0.5b-instruct"
    engine: str | None = None  # transformers | llamacpp | vllm | fake; None: by model format
    quantization: str | None = None  # GGUF file to fetch (Q4_K_M, Q8_0, ...); None: the catalog's default
    model_source: str = "huggingface"  # huggingface | modelscope: where a named model is fetched from
    cpu: bool = False
    precision: str | None = None  # fp32 | fp16 | bf16; None: by device
    ctx_size: int = 8192  # the context of one sequence: prompt plus answer
    threads: int | None = None
    max_queue: int = 256  # requests waiting for a slot before 503
    max_batch: int = 16  # sequences decoded together (continuous batching)
    max_batch_tokens: int = 512  # tokens per forward pass: decode tokens plus prefill chunks
    kv_size: int | None = None  # KV cache tokens shared by all sequences; None: ctx_size x min(4, max_batch)
    prefix_cache: bool = True  # llama.cpp, vLLM: reuse the KV cells of earlier requests' common prefixes
    omp_wait_policy: str = "auto"  # llama.cpp: OpenMP barrier wait: auto (OpenMP default) | active | passive
    tensor_parallel_size: int = 1  # vLLM: GPUs one replica's model is split over
    gpu_memory_utilization: float = 0.9  # vLLM: share of each GPU's memory it takes


def default_max_batch(engine: str | None) -> int:
    """Sequences decoded together when `--max-num-seqs` is not given: vLLM's own default on GPUs."""
    return 256 if engine == "vllm" else EngineConfig.max_batch


@dataclass(frozen=True)
class KnowledgeConfig:
    """The knowledge base (RAG): how files are chunked and how answers retrieve them."""

    chunk_size: int = 500  # characters per chunk
    chunk_overlap: int = 50  # characters shared by neighbouring chunks
    top_k: int = 3  # chunks given to the model per question
    score_threshold: float = 0.0  # chunks scoring below (cosine) are not used
    retrieval: str = "hybrid"  # hybrid (BM25 + vectors, rank-fused) | vector | keyword
    max_file_mb: float = 50.0  # larger uploads get 413
    database_url: str | None = None  # SQLAlchemy URL shared by the replicas; None: SQLite in the data dir


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may ask of a service; beyond it a clear 413, 503 or error message, never a 500."""

    max_body_mb: float = 16.0  # an HTTP body or one WebSocket message (knowledge uploads: below)
    max_upload_files: int = 32  # files per knowledge-base upload, each up to KnowledgeConfig.max_file_mb
    max_connections: int = 512  # HTTP requests in progress plus open WebSockets; one more gets 503
    ws_max_pending: int = 64  # messages one WebSocket may queue unanswered; one more closes it (1008)
    body_timeout: float = 60.0  # seconds for an ordinary body, and for each piece of an upload (408)
    # A client (address) whose requests are refused (4xx) faster than abuse_rate a second, after a
    # burst of abuse_burst, has its next requests delayed, then 429 (server/abuse.py); 0 disables.
    abuse_rate: float = 10.0
    abuse_burst: int = 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    service_name: str = "easllm"
    replica_name: str | None = None  # this process among the service's replicas (history file names)
    root_path: str = ""  # the prefix a proxy (the console's gateway) serves this service under
    api_only: bool = False
    no_api: bool = False
    max_round: int = 5
    no_template: bool = False
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral; None: from the chat template
    log_level: str = "INFO"
    log_format: str = "text"  # text | json
    metrics_public: bool = False  # /metrics without the token
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none: CORS closed
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback-bound server answers besides loopback ones
    export_history_path: Path | None = None
    export_interval: float = 3600.0
    data_dir: Path | None = None  # knowledge base and other state; None: EASLLM_HOME/services/<name>
    embedding_model: str = "multilingual-e5-small"
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def service_data_dir(self) -> Path:
        return self.data_dir or easllm_home() / "services" / self.service_name
