"""Typed errors of the core; the HTTP layer maps each to a status code once (server/errors.py)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is wrong: answered with 400 and the field named in `param`."""

    status = 400  # subclasses below answer with their own 4xx

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TooLarge(InvalidRequest):
    """An upload or body over a configured limit: answered with 413."""

    status = 413


class UnsupportedMedia(InvalidRequest):
    """A file type that is not accepted, or content that does not match its extension: 415."""

    status = 415


class Conflict(InvalidRequest):
    """The request cannot apply to the current state (e.g. an index built by another embedder): 409."""

    status = 409


class StorageFull(InvalidRequest):
    """The server's disk is full (or its quota spent): 507. Not the client's fault, but reported like
    a refusal (per file of an upload, naming the file) so the rest of a request still completes."""

    status = 507


class NotReady(RuntimeError):
    """The model is still loading: answered with 503."""


class StoreUnavailable(NotReady):
    """The knowledge base's database cannot be reached (or stays locked): answered with 503."""


class ModelNotFound(FileNotFoundError):
    """A model name or path that cannot be resolved on this machine."""


class ChecksumMismatch(RuntimeError):
    """A bundled model assembled from its packages does not match its published checksum."""


class PullFailed(ModelNotFound):
    """A model could not be fetched from its source: token, disk space, network, a missing file."""
