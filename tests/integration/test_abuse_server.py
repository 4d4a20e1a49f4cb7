"""The abuse throttle on a real `easllm serve --engine fake` over real sockets: two clients on the
loopback (127.0.0.2 floods refusals, 127.0.0.1 is served at once), and the client address a proxy on
the loopback forwards (`X-Forwarded-For`, as the console's gateway does) is the one throttled."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.servers import running_server

pytestmark = pytest.mark.integration
BAD = {"content": b'{"prompt": ', "headers": {"Content-Type": "application/json"}}


def client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def timed(client: httpx.Client, url: str, **kwargs: object) -> tuple[int, float]:
    started = time.monotonic()
    r = client.post(url, **kwargs)  # type: ignore[arg-type]
    return r.status_code, time.monotonic() - started


def test_a_flooding_address_is_slowed_and_another_is_not(tmp_path: Path) -> None:
    args = ["--engine", "fake", "--api-only", "--max-new-tokens", "4", "--data-dir", str(tmp_path / "d")]
    args += ["--abuse-rate", "2", "--abuse-burst", "4"]
    with (
        running_server(args, tmp_path, token=None) as server,
        client_from("127.0.0.2") as attacker,
        client_from("127.0.0.1") as normal,
    ):
        url = f"{server.url}/"
        flood = [timed(attacker, url, **BAD) for _ in range(8)]
        assert {status for status, _ in flood} == {400}
        # in debt: every other request waits for a token and its ticket (1 s at 2 a second)
        assert sum(seconds for _, seconds in flood[-4:]) >= 1.8
        # a forged X-Forwarded-For from a client that is not a trusted proxy: still 127.0.0.2
        headers = {**BAD["headers"], "X-Forwarded-For": "10.1.2.3"}  # type: ignore[dict-item]
        forged = [timed(attacker, url, content=BAD["content"], headers=headers) for _ in range(2)]
        assert sum(seconds for _, seconds in forged) >= 0.9
        status, seconds = timed(normal, url, **BAD)  # the other client's refusal: at once
        assert status == 400 and seconds < 0.5
        r = normal.post(url, json={"prompt": "hi"})
        assert r.status_code == 200 and r.json()["response"]

        # a proxy on the loopback (the console's gateway) forwards each client's address
        for_attacker = {**BAD["headers"], "X-Forwarded-For": "10.9.9.9"}  # type: ignore[dict-item]
        proxied = [timed(normal, url, content=BAD["content"], headers=for_attacker) for _ in range(8)]
        assert sum(seconds for _, seconds in proxied[-4:]) >= 1.8
        for_other = {**BAD["headers"], "X-Forwarded-For": "10.8.8.8"}  # type: ignore[dict-item]
        status, seconds = timed(normal, url, content=BAD["content"], headers=for_other)
        assert status == 400 and seconds < 0.5
