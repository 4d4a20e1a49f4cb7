"""The WebSocket route's budget of queued bytes over all its connections (beyond it: close 1013)."""

from __future__ import annotations

PENDING_TOTAL = 256 * 1024 * 1024  # bytes queued unanswered over all connections of a service


class PendingBytes:
    """Bytes of WebSocket messages received and not yet answered, over all connections of a service."""

    def __init__(self, limit: int = PENDING_TOTAL) -> None:
        self.limit = limit
        self.total = 0

    def take(self, size: int) -> bool:
        if self.total + size > self.limit:
            return False
        self.total += size
        return True

    def give_back(self, size: int) -> None:
        self.total -= size
