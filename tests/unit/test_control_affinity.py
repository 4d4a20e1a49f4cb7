"""Prefix-aware routing's parts: a conversation's key from its first messages, the hash ring
(every replica once, even spread, few keys move), the bound on load, and the session affinity
cookie (a local replica's id, or a session name that Ray Serve routes by)."""

import json
import math

import pytest

from easllm.control.affinity import KEY_BODY_LIMIT, HashRing, conversation_key
from easllm.control.gateway import (
    SERVE_AFFINITY_HEADER,
    SESSION,
    affinity_cookie,
    pinned_replica,
    serve_affinity,
)
from easllm.control.routing import ReplicaState
from easllm.control.runtimes.ray import RayEndpoint


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_an_eas_conversation_keeps_its_key_from_round_to_round() -> None:
    system = "You are a tour guide."
    rounds = [
        {"system_prompt": system, "prompt": "Where is the museum?", "history": []},
        {
            "system_prompt": system,
            "prompt": "When does it open?",
            "history": [["Where is the museum?", "North."]],
        },
        {
            "system_prompt": system,
            "prompt": "Tickets?",
            "history": [["Where is the museum?", "North."], ["When does it open?", "At 9."]],
            "temperature": 0.3,
        },
    ]
    keys = {conversation_key("", body(r)) for r in rounds}
    assert len(keys) == 1 and None not in keys
    other_system = {**rounds[1], "system_prompt": "You are a chef."}
    other_start = {**rounds[0], "prompt": "Where is the station?"}
    assert conversation_key("", body(other_system)) not in keys
    assert conversation_key("/", body(other_start)) not in keys


def test_an_openai_chat_is_keyed_by_its_system_messages_and_first_user_message() -> None:
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
    key = conversation_key("v1/chat/completions", body({"model": "m", "messages": first}))
    assert key is not None
    assert conversation_key("/v1/chat/completions/", body({"messages": later, "stream": True})) == key
    no_system = [{"role": "user", "content": "Hi"}]
    assert conversation_key("v1/chat/completions", body({"messages": no_system})) == conversation_key(
        "v1/chat/completions",
        body(
            {
                "messages": [
                    *no_system,
                    {"role": "assistant", "content": "Yo"},
                    {"role": "user", "content": "?"},
                ]
            }
        ),
    )
    assert conversation_key("v1/chat/completions", body({"messages": no_system})) != key
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert conversation_key("v1/chat/completions", body({"messages": parts})) is not None


def test_a_completion_is_keyed_by_its_prompts_beginning() -> None:
    head = "x" * 600
    assert conversation_key("v1/completions", body({"prompt": head + "a"})) == conversation_key(
        "v1/completions", body({"prompt": head + "b"})
    )
    assert conversation_key("v1/completions", body({"prompt": ["a", "b"]})) is None
    assert conversation_key("", b"a raw EAS prompt") == conversation_key("", b"a raw EAS prompt")


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("v1/models", b'{"messages": []}'),
        ("v1/knowledge/query", b'{"query": "x"}'),
        ("v1/chat/completions", b"{not json"),
        ("v1/chat/completions", b"[1, 2]"),
        ("v1/chat/completions", b'{"messages": "hi"}'),
        ("v1/chat/completions", b'{"messages": [1]}'),
        ("v1/chat/completions", b""),
        ("", b'{"temperature": 1}'),
        ("v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
    ],
)
def test_requests_without_a_conversation_have_no_key(path: str, raw: bytes) -> None:
    assert conversation_key(path, raw) is None


def test_a_body_beyond_the_limit_is_not_parsed() -> None:
    messages = [{"role": "user", "content": "y" * KEY_BODY_LIMIT}]
    assert conversation_key("v1/chat/completions", body({"messages": messages})) is None


def test_the_ring_walks_every_member_once() -> None:
    ring = HashRing([3, 7, 11])
    for key in ("a", "b", "conversation-42"):
        walk = list(ring.walk(key))
        assert sorted(walk) == [3, 7, 11]
    assert list(HashRing([]).walk("a")) == []


def test_keys_spread_evenly_and_few_move_when_a_replica_leaves() -> None:
    keys = [f"conversation-{i}" for i in range(3000)]
    ring = HashRing([1, 2, 3])
    owner = {k: next(ring.walk(k)) for k in keys}
    shares = [list(owner.values()).count(m) / len(keys) for m in (1, 2, 3)]
    assert all(0.22 < s < 0.45 for s in shares), shares
    smaller = HashRing([1, 3])
    moved = [k for k in keys if next(smaller.walk(k)) != owner[k]]
    assert all(owner[k] == 2 for k in moved), "only the keys of the replica that left move"
    grown = HashRing([1, 2, 3, 4])
    moved_to_new = [k for k in keys if next(grown.walk(k)) != owner[k]]
    assert all(next(grown.walk(k)) == 4 for k in moved_to_new)
    assert 0.12 < len(moved_to_new) / len(keys) < 0.4


def test_the_home_replica_takes_its_key_while_the_load_is_even() -> None:
    ring = HashRing([1, 2, 3])
    home = next(ring.walk("k"))
    assert ring.pick("k", {1: 0, 2: 0, 3: 0}, 1.25) == home
    assert ring.pick("k", {1: 2, 2: 2, 3: 2}, 1.25) == home


def test_a_busy_home_replica_passes_the_key_to_the_next_one_on_the_ring() -> None:
    ring = HashRing([1, 2, 3])
    home, second, third = ring.walk("k")
    loads = {home: 3, second: 0, third: 0}  # bound: ceil(1.25 * 4 / 3) = 2
    assert ring.pick("k", loads, 1.25) == second
    loads = {home: 2, second: 2, third: 0}  # bound: ceil(1.25 * 5 / 3) = 3: home still fits
    assert ring.pick("k", loads, 1.25) == home
    assert ring.pick("k", {home: 1, second: 0, third: 0}, 1.0) == second  # bound ceil(2/3) = 1
    assert ring.pick("k", {second: 0, third: 0}, 1.25) == second, "members not offered are skipped"
    assert ring.pick("k", {}, 1.25) is None


def test_one_hot_conversation_never_pushes_a_replica_past_the_bound() -> None:
    ring = HashRing([1, 2, 3, 4])
    loads = dict.fromkeys((1, 2, 3, 4), 0)
    for n in range(1, 41):  # 40 requests of one conversation, none finishing
        chosen = ring.pick("hot", loads, 1.25)
        assert chosen is not None
        loads[chosen] += 1
        assert max(loads.values()) <= math.ceil(1.25 * n / 4)
    # it fills replicas up to the bound in ring order: ceil(1.25 * 40 / 4) = 13 each, so 40 need all four
    assert min(loads.values()) >= 1, loads


def test_the_affinity_cookie_names_a_local_replica_or_a_serve_session() -> None:
    local = ReplicaState(4, "svc", 1, 40000, "/tmp/r.log", status="ready")
    ray = RayEndpoint(-1, "svc", 1, 8000, "", status="ready", base_url="http://127.0.0.1:8000/x")
    assert affinity_cookie(local, "") == "4" and affinity_cookie(local, "9") == "4"
    session = affinity_cookie(ray, "")
    assert SESSION.fullmatch(session) and affinity_cookie(ray, session) == session
    assert affinity_cookie(ray, "x" * 5000) != "x" * 5000, "a forged cookie is replaced"
    assert pinned_replica({"easllm_replica": "12"}) == 12
    assert pinned_replica({"easllm_replica": "9" * 40}) is None and pinned_replica({}) is None


def test_serve_is_told_the_session_else_the_conversation() -> None:
    local = ReplicaState(4, "svc", 1, 40000, "/tmp/r.log", status="ready")
    ray = RayEndpoint(-1, "svc", 1, 8000, "", status="ready")
    assert serve_affinity(local, "s" + "a" * 24, "k") == []
    assert serve_affinity(ray, "s" + "a" * 24, "k") == [(SERVE_AFFINITY_HEADER, "session:s" + "a" * 24)]
    assert serve_affinity(ray, None, "k") == [(SERVE_AFFINITY_HEADER, "conversation:k")]
    assert serve_affinity(ray, None, None) == []
