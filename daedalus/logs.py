"""Structured logging shared by every command.

Each record is an event name plus key=value fields, rendered either as one
human-readable line or as one JSON object (for journald / log shippers).
Use ``get_logger(__name__).info("event_name", key=value, ...)``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import orjson

_FIELDS = "daedalus_fields"


class EventLogger:
    """A thin wrapper over :mod:`logging` that takes fields as keyword arguments."""

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger(name)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            exc_info = fields.pop("exc_info", False)
            self._log.log(level, event, extra={_FIELDS: fields}, stacklevel=3, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _render_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "='):
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-22T16:40:01.123Z INFO  daedalus.sim sim_ready port=8765``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS, {})
        parts = [_timestamp(record.created), f"{record.levelname:<5}", record.name, record.getMessage()]
        parts += [f"{k}={_render_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger (replacing its handlers); writes to ``stream``, stderr by
    default (the supervisor logs to stdout, where journald reads it)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: too chatty for a market-data box.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
