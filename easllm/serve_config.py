"""Parsed `easllm serve` flags -> the config dataclasses, one to one (`serve_flags.py` declares them)."""

from __future__ import annotations

import argparse

from easllm.config import (
    EngineConfig,
    KnowledgeConfig,
    LimitsConfig,
    SamplingDefaults,
    ServerConfig,
    default_max_batch,
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
        allowed_hosts=tuple(args.allowed_hosts),
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
