"""Structured logging: one JSON object per line, for log pipelines.

The library logs through the standard :mod:`logging` module (loggers under
``transport``); key events carry fields such as ``ensemble``, ``queue`` and
``request_id`` as record attributes. :class:`JsonLogFormatter` renders them
as JSON; :func:`configure_logging` installs it (or a plain text format) on
the root logger. Secrets never reach a log record: configuration secrets are
``SecretStr`` and render as ``**********``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["JsonLogFormatter", "configure_logging"]

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


class JsonLogFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", <extra fields>, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = _plain(value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(
    level: int | str = "INFO", *, fmt: Literal["text", "json"] = "text", stream: Any = None
) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (stderr) as
    text or JSON lines; returns the installed handler (replacing handlers a
    previous call installed). Raises: ValueError for an unknown level/format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("transport")
    handler.setFormatter(
        JsonLogFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "transport"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
