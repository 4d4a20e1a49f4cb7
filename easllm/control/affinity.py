"""Which replica should hold a conversation: its key, and a hash ring with bounded load.

A conversation's next request repeats its first messages, so the replica that answered its
earlier rounds holds them in its prefix cache. `conversation_key` reads those first messages
from a request body — EAS `system_prompt` + the first round's question; OpenAI the leading
system messages + the first user message (`messages[0:2]` when there is a system prompt); a
completion's first characters — and `HashRing` maps the key to a replica by consistent hashing
with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016; HAProxy's `hash-balance-factor`):
walking the ring from the key's point, the first replica whose requests in flight stay within
`load_factor` x the average (plus the new request) takes it, so one hot conversation cannot pin a
replica, and a replica that joins or leaves moves only the keys next to it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

Member = TypeVar("Member", bound=Hashable)  # a replica: its database id, or Serve's replica id

VIRTUAL_NODES = 100  # points per replica on the ring: keys spread within a few % of even
KEY_BODY_LIMIT = 1 << 20  # bodies larger than this are not parsed for a key (least-loaded instead)
PROMPT_KEY_CHARS = 512  # a completion prompt's first characters make its key
KEYED_PATHS = {"": "eas", "v1/chat/completions": "chat", "v1/completions": "completion"}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)


def conversation_key(path: str, body: bytes) -> str | None:
    """The key of the conversation a POST body belongs to; None when it has none (or is not JSON)."""
    kind = KEYED_PATHS.get(path.strip("/"))
    if kind is None or not body or len(body) > KEY_BODY_LIMIT:
        return None
    if not body.lstrip().startswith(b"{"):
        # EAS accepts the raw prompt as the body: a single round, keyed by its beginning
        return _digest(kind, [body[:PROMPT_KEY_CHARS].decode(errors="replace")]) if kind == "eas" else None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    parts = {"eas": _eas_parts, "chat": _chat_parts, "completion": _completion_parts}[kind](request)
    return _digest(kind, parts) if parts else None


def _digest(kind: str, parts: list[str]) -> str:
    return hashlib.blake2b(json.dumps([kind, *parts]).encode(), digest_size=16).hexdigest()


def _eas_parts(request: Mapping[str, Any]) -> list[str]:
    history = request.get("history")
    first = None
    if isinstance(history, list) and history and isinstance(history[0], list | tuple) and history[0]:
        first = history[0][0]
    if first is None:
        first = request.get("prompt", request.get("input_ids"))
    if first is None:
        return []
    return [_text(request.get("system_prompt") or ""), _text(first)]


def _chat_parts(request: Mapping[str, Any]) -> list[str]:
    messages = request.get("messages")
    if not isinstance(messages, list):
        return []
    parts = []
    for message in messages:
        if not isinstance(message, dict):
            return []
        parts.append(f"{message.get('role')}:{_text(message.get('content'))}")
        if message.get("role") not in ("system", "developer"):
            break  # the first user (or other) message ends the key
    return parts


def _completion_parts(request: Mapping[str, Any]) -> list[str]:
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if len(prompt) == 1 else None  # several prompts: no one conversation
    return [_text(prompt)[:PROMPT_KEY_CHARS]] if prompt is not None else []


class HashRing(Generic[Member]):
    """A consistent-hash ring of replica ids, `VIRTUAL_NODES` points each."""

    def __init__(self, members: Iterable[Member], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.members = frozenset(members)
        points = sorted((_hash(f"replica-{m}-{i}"), m) for m in self.members for i in range(virtual_nodes))
        self._hashes = [h for h, _ in points]
        self._owners = [m for _, m in points]

    def walk(self, key: str) -> Iterator[Member]:
        """Every member once, clockwise from the key's point on the ring."""
        if not self._owners:
            return
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[Member] = set()
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.members):
                    return

    def pick(self, key: str, loads: Mapping[Member, int], load_factor: float) -> Member | None:
        """The first member clockwise whose load with this request stays within
        ceil(load_factor x average load including it); `loads` holds the members to choose from."""
        if not loads:
            return None
        bound = math.ceil(load_factor * (sum(loads.values()) + 1) / len(loads))
        for member in self.walk(key):
            if member in loads and loads[member] + 1 <= bound:
                return member
        return None
