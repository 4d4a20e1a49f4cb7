"""Typed errors of the core; the HTTP layer maps each to a status code once (server/errors.py)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is wrong: answered with 400 and the field named in `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotReady(RuntimeError):
    """The model is still loading: answered with 503."""


class ModelNotFound(FileNotFoundError):
    """A model name or path that cannot be resolved on this machine."""


class ChecksumMismatch(RuntimeError):
    """A bundled model assembled from its packages does not match its published checksum."""
