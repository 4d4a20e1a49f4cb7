"""Prometheus metrics of one service, in a registry of its own (`GET /metrics` renders it).

Counters and histograms move as requests and rounds happen; the engine's queue, KV cache and
totals, the knowledge base's size and the history export's state are read when scraped.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from easllm.engine.base import Engine

if TYPE_CHECKING:
    from easllm.export.exporter import HistoryExporter
    from easllm.rag.knowledge import KnowledgeBase

log = logging.getLogger(__name__)

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 240, 480, 960, 1920)


class ServiceMetrics:
    def __init__(
        self,
        engine: Engine,
        knowledge: KnowledgeBase | None = None,
        history: HistoryExporter | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "easllm_http_requests",
            "HTTP requests and WebSocket connections",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "easllm_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included)",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge(
            "easllm_http_requests_in_progress", "Requests and connections being answered", registry=r
        )
        self.rounds = Counter(
            "easllm_rounds",
            "Answered rounds (generations) by API and finish reason",
            ["api", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("easllm_prompt_tokens", "Prompt tokens processed", ["api"], registry=r)
        self.generation_tokens = Counter("easllm_generation_tokens", "Tokens generated", ["api"], registry=r)
        self.time_to_first_token = Histogram(
            "easllm_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated text",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = BatchHistogram(
            "easllm_inter_token_latency_seconds",
            "Time between successive pieces of generated text of one round (usually one token each)",
            ITL_BUCKETS,
        )
        r.register(self.inter_token_latency)
        self.round_latency = Histogram(
            "easllm_e2e_request_latency_seconds",
            "Time from a request's arrival to the last token of its answer",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(EngineCollector(engine))
        if knowledge is not None:
            r.register(KnowledgeCollector(knowledge))
        if history is not None:
            r.register(HistoryCollector(history))
        ProcessCollector(registry=r)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): OpenMetrics when the scraper asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class BatchHistogram(Collector):
    """A histogram by `api` fed a round's samples at once: for per-token observations, where
    prometheus-client's Histogram (a lock per sample, ~4 µs) would cost more than the token."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(buckets)
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # api: (counts per bucket + inf, [sum])
        self._lock = threading.Lock()

    def observe_many(self, api: str, values: Sequence[float]) -> None:
        if not values:
            return
        with self._lock:
            counts, total = self._series.setdefault(api, ([0] * (len(self.bounds) + 1), [0.0]))
            for v in values:
                counts[bisect.bisect_left(self.bounds, v)] += 1
            total[0] += sum(values)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["api"])
        with self._lock:
            series = [(api, list(counts), total[0]) for api, (counts, total) in self._series.items()]
        for api, counts, total in series:
            cumulative = list(itertools.accumulate(counts))
            buckets = [(floatToGoString(b), c) for b, c in zip(self.bounds, cumulative, strict=False)]
            family.add_metric([api], [*buckets, ("+Inf", cumulative[-1])], total)
        yield family


class EngineCollector(Collector):
    """The engine's state at scrape time: `engine.health()`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            h = self.engine.health()
        except Exception:
            log.exception("engine health failed during a metrics scrape")
            return
        yield InfoMetricFamily(
            "easllm_model", "The model served", value={"model": h.model, "engine": h.engine}
        )
        yield GaugeMetricFamily(
            "easllm_engine_ready", "1 once the model is loaded and serving", value=int(h.ready)
        )
        yield GaugeMetricFamily("easllm_num_requests_running", "Sequences being decoded", value=h.running)
        yield GaugeMetricFamily(
            "easllm_num_requests_waiting", "Requests waiting for the engine", value=h.waiting
        )
        yield CounterMetricFamily(
            "easllm_engine_finished_requests", "Requests the engine finished", value=h.finished_total
        )
        yield CounterMetricFamily(
            "easllm_engine_aborted_requests",
            "Requests aborted in the engine (client gone, cancelled)",
            value=h.aborted_total,
        )
        d = h.details
        used, total = d.get("kv_cells_used"), d.get("kv_cells_total")
        if isinstance(used, int | float) and isinstance(total, int | float) and total > 0:
            yield GaugeMetricFamily(
                "easllm_kv_cache_used_cells", "KV cache cells (tokens) in use", value=used
            )
            yield GaugeMetricFamily(
                "easllm_kv_cache_total_cells", "KV cache cells (tokens) in all", value=total
            )
            yield GaugeMetricFamily(
                "easllm_kv_cache_usage_ratio", "KV cache in use, 0 to 1", value=used / total
            )
        preempted = d.get("preempted_total")
        if isinstance(preempted, int):
            yield CounterMetricFamily(
                "easllm_engine_preempted_requests", "Sequences preempted for KV cache room", value=preempted
            )
        steps = d.get("steps")
        if isinstance(steps, int):
            yield CounterMetricFamily("easllm_engine_steps", "Engine forward passes", value=steps)
        cached = d.get("kv_cells_cached")
        if isinstance(cached, int):
            yield GaugeMetricFamily(
                "easllm_kv_cache_cached_cells", "KV cache cells only cached prefixes hold", value=cached
            )
        queries, hits = d.get("prefix_cache_queries_total"), d.get("prefix_cache_hits_total")
        if isinstance(queries, int) and isinstance(hits, int):  # tokens, as vLLM's prefix_cache_*
            yield CounterMetricFamily(
                "easllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", value=queries
            )
            yield CounterMetricFamily(
                "easllm_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=hits
            )


class KnowledgeCollector(Collector):
    def __init__(self, knowledge: KnowledgeBase) -> None:
        self.knowledge = knowledge

    def collect(self) -> Iterator[Metric]:
        try:
            files, chunks = len(self.knowledge.files()), self.knowledge.chunk_count()
        except Exception:
            log.exception("reading the knowledge base's size failed during a metrics scrape")
            return
        yield GaugeMetricFamily("easllm_knowledge_files", "Files in the knowledge base", value=files)
        yield GaugeMetricFamily("easllm_knowledge_chunks", "Chunks in the knowledge base", value=chunks)


class HistoryCollector(Collector):
    def __init__(self, history: HistoryExporter) -> None:
        self.history = history

    def collect(self) -> Iterator[Metric]:
        s = self.history.stats
        yield CounterMetricFamily("easllm_history_records", "Rounds recorded", value=s.records_total)
        yield CounterMetricFamily(
            "easllm_history_exported_records",
            "Rounds written to export files",
            value=s.exported_records_total,
        )
        yield CounterMetricFamily(
            "easllm_history_export_errors",
            "Failed attempts to write an export file",
            value=s.export_errors_total,
        )
        yield CounterMetricFamily(
            "easllm_history_wal_errors", "Failed writes to the write-ahead log", value=s.wal_errors_total
        )
        yield CounterMetricFamily(
            "easllm_history_dropped_records",
            "Rounds lost because the disk failed for too long",
            value=s.dropped_records_total,
        )
        yield GaugeMetricFamily(
            "easllm_history_pending_periods",
            "Ended periods not yet exported",
            value=self.history.pending_periods,
        )
        if s.last_export_time is not None:
            yield GaugeMetricFamily(
                "easllm_history_last_export_timestamp_seconds",
                "When the last export file was written (Unix time)",
                value=s.last_export_time,
            )
