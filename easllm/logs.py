"""Logging for `easllm serve`: `--log-level` sets the root level, `--log-format` text or JSON.

JSON lines carry time, level, logger and message, plus the access log's fields (request id,
route, status, latency, tokens) as top-level keys, so a log shipper needs no parsing.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


SECRET_IN_URL = re.compile(r"([?&](?:token|access_token|api_key)=)[^&\s\"']+", re.IGNORECASE)
# header lines, as uvicorn's WebSocket handshake logs them at DEBUG ("< Authorization: ...")
SECRET_HEADER = re.compile(r"\b((?:proxy-)?authorization|cookie|set-cookie)(\s*:\s*)[^\r\n]+", re.IGNORECASE)
REDACTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "easllm")


class RedactSecrets(logging.Filter):
    """Masks tokens in a record's message: `?token=...` (uvicorn logs each WebSocket handshake's
    URL, and browsers and the console's gateway pass the service token there) and the
    Authorization and Cookie header lines uvicorn logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if SECRET_IN_URL.search(message) or SECRET_HEADER.search(message):
            message = SECRET_IN_URL.sub(r"\1***", message)
            record.msg, record.args = SECRET_HEADER.sub(r"\1\2***", message), None
        return True


def redact_secrets(*handlers: logging.Handler) -> None:
    """Install `RedactSecrets` on uvicorn's and our loggers (records logged on them directly) and on
    `handlers` (records that propagate to them); once each, so calling it again changes nothing."""
    targets: list[logging.Filterer] = [logging.getLogger(name) for name in REDACTED_LOGGERS]
    for target in [*targets, *handlers]:
        if not any(isinstance(f, RedactSecrets) for f in target.filters):
            target.addFilter(RedactSecrets())


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Replace the root handlers with one on stderr; uvicorn's loggers propagate to it."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    redact_secrets(handler)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
