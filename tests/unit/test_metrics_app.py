"""`/metrics`, request ids and the access log, over the fake engine through FastAPI's TestClient."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from easllm.config import SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.engine.types import EngineHealth
from easllm.logs import JsonFormatter, configure_logging
from easllm.server.metrics import BatchHistogram, EngineCollector, KnowledgeCollector
from tests.apps import serving

TOKEN = "s3cret"
AUTH = {"Authorization": TOKEN}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def start(tmp_path: Any, **config: Any) -> Iterator[TestClient]:
    settings = {
        "token": TOKEN,
        "data_dir": tmp_path,
        "sampling": SamplingDefaults(max_new_tokens=8),
        **config,
    }
    with serving(ServerConfig(**settings), FakeEngine(context_length=1024)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Any) -> Iterator[TestClient]:
    with start(tmp_path) as c:
        yield c


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# -- the token rule --


def test_metrics_need_the_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "wrong"}).status_code == 401
    r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "easllm_engine_ready 1.0" in r.text
    om = client.get("/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")


def test_metrics_public_opens_metrics_only(tmp_path: Any) -> None:
    with start(tmp_path, metrics_public=True) as client:
        assert client.get("/metrics").status_code == 200
        assert client.post("/", json={"prompt": "hi"}).status_code == 401


def test_metrics_refuse_other_methods(client: TestClient) -> None:
    assert client.post("/metrics", headers=AUTH).status_code == 405


# -- counters and histograms move by what the requests did --


def test_counters_and_histograms_move_by_the_right_amounts(client: TestClient) -> None:
    before = scrape(client)
    plain = client.post("/", json={"prompt": "one"}, headers=AUTH).json()
    streamed = client.post("/", json={"prompt": "two", "use_stream_chat": True}, headers=AUTH)
    final = json.loads(streamed.content.split(b"\0")[-2])
    assert client.post("/", json={"history": []}, headers=AUTH).status_code == 400
    chat = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        headers=AUTH,
    ).json()
    with client.websocket_connect("/", headers=AUTH) as ws:
        ws.send_text(json.dumps({"prompt": "ws [eos]"}))
        while ws.receive_text() != "<EOS>":
            pass
    after = scrape(client)

    assert moved(before, after, "easllm_http_requests_total", route="/", method="POST", status="200") == 2
    assert moved(before, after, "easllm_http_requests_total", route="/", method="POST", status="400") == 1
    assert moved(before, after, "easllm_http_requests_total", route="/", method="WS", status="101") == 1
    assert (
        moved(
            before,
            after,
            "easllm_http_requests_total",
            route="/v1/chat/completions",
            method="POST",
            status="200",
        )
        == 1
    )
    assert moved(before, after, "easllm_rounds_total", api="eas", finish_reason="length") == 2
    assert moved(before, after, "easllm_rounds_total", api="openai.chat", finish_reason="length") == 1
    assert moved(before, after, "easllm_rounds_total", api="websocket", finish_reason="stop") == 1
    eas_prompt = plain["usage"]["prompt_tokens"] + final["usage"]["prompt_tokens"]
    assert moved(before, after, "easllm_prompt_tokens_total", api="eas") == eas_prompt
    assert moved(before, after, "easllm_generation_tokens_total", api="eas") == 16
    assert moved(before, after, "easllm_generation_tokens_total", api="openai.chat") == 3
    assert (
        moved(before, after, "easllm_prompt_tokens_total", api="openai.chat")
        == chat["usage"]["prompt_tokens"]
    )
    assert moved(before, after, "easllm_time_to_first_token_seconds_count", api="eas") == 2
    assert moved(before, after, "easllm_e2e_request_latency_seconds_count", api="eas") == 2
    # the fake engine sends one token per delta: 8 tokens are 7 gaps
    assert moved(before, after, "easllm_inter_token_latency_seconds_count", api="eas") == 14
    assert value(after, "easllm_time_to_first_token_seconds_bucket", api="eas", le="+Inf") == value(
        after, "easllm_time_to_first_token_seconds_count", api="eas"
    )
    assert moved(before, after, "easllm_engine_finished_requests_total") == 4
    assert value(after, "easllm_num_requests_running") == 0
    assert value(after, "easllm_model_info", model="fake-model", engine="fake") == 1
    assert value(after, "easllm_knowledge_files") == 0
    assert ("process_resident_memory_bytes", ()) in after


def test_unknown_paths_share_one_label(client: TestClient) -> None:
    for path in ("/nope", "/nope/deeper", "/v1/xyz"):
        assert client.get(path, headers=AUTH).status_code == 404
    after = scrape(client)
    assert value(after, "easllm_http_requests_total", route="unmatched", method="GET", status="404") == 3
    assert not any("nope" in str(labels) for _, labels in after)


def test_each_app_has_its_own_registry(tmp_path: Any) -> None:
    with start(tmp_path / "a") as a, start(tmp_path / "b") as b:
        a.post("/", json={"prompt": "hi [eos]"}, headers=AUTH)
        assert value(scrape(a), "easllm_rounds_total", api="eas", finish_reason="stop") == 1
        assert value(scrape(b), "easllm_rounds_total", api="eas", finish_reason="stop") == 0


# -- collectors read at scrape time --


class StubEngine:
    def __init__(self, health: EngineHealth | Exception) -> None:
        self._health = health

    def health(self) -> EngineHealth:
        if isinstance(self._health, Exception):
            raise self._health
        return self._health


def test_engine_state_and_kv_cache_are_read_at_scrape_time() -> None:
    details = {"kv_cells_used": 1024, "kv_cells_total": 4096, "preempted_total": 2, "steps": 77}
    registry = CollectorRegistry()
    registry.register(EngineCollector(StubEngine(EngineHealth(True, "llamacpp", "m", 3, 5, 4, 9, details))))
    get = registry.get_sample_value
    assert get("easllm_num_requests_running") == 3 and get("easllm_num_requests_waiting") == 5
    assert (
        get("easllm_engine_aborted_requests_total") == 4 and get("easllm_engine_finished_requests_total") == 9
    )
    assert get("easllm_kv_cache_usage_ratio") == 0.25 and get("easllm_kv_cache_total_cells") == 4096
    assert get("easllm_engine_preempted_requests_total") == 2 and get("easllm_engine_steps_total") == 77


def test_an_engine_without_kv_details_has_no_kv_metrics_and_a_failing_one_breaks_nothing() -> None:
    registry = CollectorRegistry()
    registry.register(EngineCollector(StubEngine(EngineHealth(True, "fake", "m"))))
    assert registry.get_sample_value("easllm_kv_cache_usage_ratio") is None
    broken = CollectorRegistry()
    broken.register(EngineCollector(StubEngine(RuntimeError("boom"))))
    assert broken.get_sample_value("easllm_engine_ready") is None  # scraped, just without engine metrics


def test_knowledge_base_size() -> None:
    class Kb:
        def files(self) -> list[object]:
            return [object(), object()]

        def chunk_count(self) -> int:
            return 7

    registry = CollectorRegistry()
    registry.register(KnowledgeCollector(Kb()))  # type: ignore[arg-type]
    assert registry.get_sample_value("easllm_knowledge_files") == 2
    assert registry.get_sample_value("easllm_knowledge_chunks") == 7


def test_batch_histogram_counts_each_sample_in_its_bucket() -> None:
    registry = CollectorRegistry()
    itl = BatchHistogram("t_seconds", "test", (0.01, 0.1, 1))
    registry.register(itl)
    itl.observe_many("eas", [0.005, 0.01, 0.05, 0.1, 2.0])  # bounds are inclusive (le)
    itl.observe_many("eas", [])
    itl.observe_many("ws", [0.5])
    get = registry.get_sample_value
    assert [get("t_seconds_bucket", {"api": "eas", "le": le}) for le in ("0.01", "0.1", "1.0", "+Inf")] == [
        2,
        4,
        4,
        5,
    ]
    assert get("t_seconds_count", {"api": "eas"}) == 5 and get("t_seconds_sum", {"api": "eas"}) == 2.165
    assert (
        get("t_seconds_count", {"api": "ws"}) == 1
        and get("t_seconds_bucket", {"api": "ws", "le": "0.1"}) == 0
    )


# -- request ids and the access log --


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert client.post("/", json={"prompt": "x"}).headers["x-request-id"]  # a 401 has one too
    given = client.get("/health", headers={"X-Request-Id": "trace-42.a"})
    assert given.headers["x-request-id"] == "trace-42.a"
    odd = client.get("/health", headers={"X-Request-Id": "x" * 65})
    assert odd.headers["x-request-id"] != "x" * 65  # too long: replaced, never echoed


def test_one_access_line_per_request_with_tokens_and_no_prompt_or_token(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    r = client.post("/", json={"prompt": "SECRET-PROMPT-TEXT"}, headers={**AUTH, "X-Request-Id": "abc"})
    usage = r.json()["usage"]
    access = [rec for rec in caplog.records if rec.name == "easllm.access"]
    assert len(access) == 1
    fields = access[0].access  # type: ignore[attr-defined]
    assert fields["request_id"] == "abc" and fields["route"] == "/" and fields["status"] == 200
    assert fields["prompt_tokens"] == usage["prompt_tokens"]
    assert fields["completion_tokens"] == usage["completion_tokens"] and fields["rounds"] == 1
    assert fields["latency_ms"] > 0
    text = "\n".join(rec.getMessage() for rec in caplog.records if rec.levelno >= logging.INFO)
    assert "abc" in text and "SECRET-PROMPT-TEXT" not in text and TOKEN not in text


def test_successful_probes_log_at_debug(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="easllm.access")
    client.get("/health")
    client.get("/metrics")  # 401: worth an INFO line
    levels = [(rec.access["route"], rec.levelno) for rec in caplog.records if rec.name == "easllm.access"]  # type: ignore[attr-defined]
    assert levels == [("/health", logging.DEBUG), ("/metrics", logging.INFO)]


def test_json_log_lines_carry_the_access_fields() -> None:
    record = logging.LogRecord("easllm.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.access = {"request_id": "r1", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /x" and line["level"] == "INFO" and line["logger"] == "easllm.access"
    assert line["request_id"] == "r1" and line["status"] == 200 and line["time"].endswith("Z")


def test_configure_logging_sets_the_root_level_and_format() -> None:
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        configure_logging("WARNING", "json")
        assert root.level == logging.WARNING
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        with pytest.raises(ValueError):
            configure_logging("INFO", "xml")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
