"""Schemathesis against the served OpenAPI document, in-process over ASGI, with and without the token.

Every operation gets valid bodies (which generate text on the fake engine) and invalid ones
(wrong types, out-of-range values, missing fields, bad media types). Properties: never a 5xx;
every 4xx is a JSON error with a message; without the token, every route but the probes is
401; afterwards the server is healthy and the engine idle. Bounded: a few dozen examples per
operation and mode (`FUZZ_EXAMPLES` raises it for a longer hunt).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.python.asgi import shutdown_lifespans

from easllm.app import create_app
from easllm.config import KnowledgeConfig, SamplingDefaults, ServerConfig
from easllm.engine.backends.fake import FakeEngine
from easllm.server.lockout import FailedTokens
from easllm.server.state import state_of

TOKEN = "fuzz-token"
AUTH = {"Authorization": TOKEN}
PROBES = {"/live", "/health", "/ready"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))


@dataclass
class Tally:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, status: int) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FastAPI, FakeEngine]]:
    engine = FakeEngine(context_length=512)
    config = ServerConfig(
        token=TOKEN,
        api_only=True,
        data_dir=tmp_path,
        sampling=SamplingDefaults(max_new_tokens=8),
        knowledge=KnowledgeConfig(max_file_mb=0.5),
    )
    app = create_app(config, engine)
    yield app, engine
    shutdown_lifespans()  # schemathesis runs an app's lifespan from its first request until told


def error_message(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("message") if isinstance(error, dict) else None


def fuzz(
    app: FastAPI,
    mode: schemathesis.GenerationMode,
    headers: dict[str, str],
    tally: Tally,
    authorized: bool,
    examples: int = EXAMPLES,
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    for result in schema.get_all_operations():
        with contextlib.suppress(Unsatisfiable):  # negative mode, and nothing in the operation to break
            fuzz_operation(result.ok(), mode, headers, tally, authorized, examples)


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    headers: dict[str, str],
    tally: Tally,
    authorized: bool,
    examples: int,
) -> None:
    label = operation.label

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a failure is recorded, not shrunk: the tally names it
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def exercise(case: schemathesis.Case) -> None:
        response = case.call(headers=dict(headers))  # call() adds to the dict it is given
        status = response.status_code
        tally.add(status)
        if status >= 500:
            tally.failures.append(f"{label}: {status} {response.text[:200]}\n{case.as_curl_command()}")
        elif status >= 400 and not error_message(response):
            tally.failures.append(f"{label}: {status} without a JSON error: {response.text[:200]}")
        elif not authorized and case.path not in PROBES and status not in (401, 404):
            # 404: a path parameter that no route matches (e.g. one with a slash) reaches no route
            tally.failures.append(f"{label}: {status} without the token")

    exercise()


def assert_healthy_and_idle(app: FastAPI, engine: FakeEngine) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    live = schema["/health"]["GET"].Case().call()
    assert live.status_code == 200 and live.json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while (engine.health().running or engine.health().waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (engine.health().running, engine.health().waiting) == (0, 0)


@pytest.mark.parametrize(
    "mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], ids=str
)
def test_with_the_token_no_request_gets_a_5xx(served: tuple[FastAPI, FakeEngine], mode: Any) -> None:
    app, engine = served
    tally = Tally()
    fuzz(app, mode, AUTH, tally, authorized=True)
    print(f"\nfuzzed {tally.requests} requests ({mode}, with the token): {sorted(tally.statuses.items())}")
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert tally.requests >= 7 * EXAMPLES  # the 8 operations with bodies or parameters all ran
        assert tally.statuses.get(200, 0) >= 2 * EXAMPLES  # valid requests really generated text
    else:  # the 6 operations with bodies (path parameters are strings: nothing to make invalid)
        assert sum(n for s, n in tally.statuses.items() if 400 <= s < 500) >= 4 * EXAMPLES
    assert_healthy_and_idle(app, engine)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "wrong"}, {"Authorization": f"Bearer {TOKEN}x"}], ids=str
)
def test_without_the_token_every_route_but_the_probes_is_401(
    served: tuple[FastAPI, FakeEngine], headers: dict[str, str]
) -> None:
    app, engine = served
    state_of(app).failed_tokens = FailedTokens(free=10**6)  # the lockout (429) is tested on its own
    tally = Tally()
    fuzz(app, schemathesis.GenerationMode.POSITIVE, headers, tally, authorized=False, examples=EXAMPLES // 3)
    print(
        f"\nfuzzed {tally.requests} requests (token {headers or 'absent'}): {sorted(tally.statuses.items())}"
    )
    assert not tally.failures, "\n\n".join(tally.failures[:10])
    assert set(tally.statuses) <= {200, 401, 404}  # the probes, the refusals, paths no route matches
    assert tally.statuses[401] >= 7 * (EXAMPLES // 3)
    assert_healthy_and_idle(app, engine)
